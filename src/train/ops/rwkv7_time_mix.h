// Training ops: the RWKV-7 time mix (spec model.md §3), forward and backward side by side. First the
// three fused pieces of the op contract (wkv inputs, value residual, output), then the whole time mix as
// one op with its saved activations. Backward functions ADD into their outputs.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "train/ops/elementwise.h"
#include "train/ops/linear.h"
#include "train/ops/norm.h"
#include "train/ops/wkv7.h"

namespace rwkvx::train {

// ---- §3 steps 3, 4, 6: decay, in-context rate, removal key, modified key ---------------------------
// In [T, C]: wl (decay LoRA output), al (rate LoRA output), k. Params [C]: w0, a0, k_k, k_a.
// Out [T, C]: w = exp(-e^{-1/2} σ(w0 + wl)), a = σ(a0 + al), alpha = -kk, beta = kk ⊙ a with
// kk = normalize_head(k ⊙ k_k), k_out = k ⊙ (1 + (a - 1) ⊙ k_a).
template <class S>
void wkv_inputs_forward(const S* wl, const S* al, const S* k, const S* w0, const S* a0, const S* k_k,
                        const S* k_a, S* w, S* a, S* alpha, S* beta, S* k_out, int64_t T, int64_t C, int64_t N) {
  const double c_w = -std::exp(-0.5);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = t * C;
    for (int64_t c = 0; c < C; ++c) {
      w[o + c] = S(std::exp(c_w / (1.0 + std::exp(-double(S(w0[c] + wl[o + c]))))));
      a[o + c] = sigmoid_of(S(a0[c] + al[o + c]));
    }
    for (int64_t h = 0; h < C / N; ++h) {
      double norm = 0;
      for (int64_t j = h * N; j < (h + 1) * N; ++j) {
        const double kk = double(k[o + j]) * double(k_k[j]);
        norm += kk * kk;
      }
      const double inv = 1.0 / std::max(std::sqrt(norm), 1e-12);
      for (int64_t j = h * N; j < (h + 1) * N; ++j) {
        const S kk = S(double(k[o + j]) * double(k_k[j]) * inv);
        alpha[o + j] = -kk;
        beta[o + j] = kk * a[o + j];
      }
    }
    for (int64_t c = 0; c < C; ++c) k_out[o + c] = k[o + c] * (S(1) + (a[o + c] - S(1)) * k_a[c]);
  }
}

// Gradients dw, dalpha, dbeta, dk_out → dwl, dal, dk, dw0, da0, dk_k, dk_a (inputs recomputed).
template <class S>
void wkv_inputs_backward(const S* dw, const S* dalpha, const S* dbeta, const S* dk_out, const S* wl, const S* al,
                         const S* k, const S* w0, const S* a0, const S* k_k, const S* k_a, S* dwl, S* dal, S* dk,
                         S* dw0, S* da0, S* dk_k, S* dk_a, int64_t T, int64_t C, int64_t N) {
  const double c_w = -std::exp(-0.5);
  std::vector<double> kk(static_cast<size_t>(N)), dkk(static_cast<size_t>(N));
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = t * C;
    for (int64_t h = 0; h < C / N; ++h) {
      double norm = 0;
      for (int64_t j = 0; j < N; ++j) {
        const double x = double(k[o + h * N + j]) * double(k_k[h * N + j]);
        norm += x * x;
      }
      norm = std::sqrt(norm);
      const double inv = 1.0 / std::max(norm, 1e-12);
      double dot = 0;
      for (int64_t j = 0; j < N; ++j) {
        const int64_t c = h * N + j, i = o + c;
        const double a = 1.0 / (1.0 + std::exp(-(double(a0[c]) + double(al[i]))));
        kk[size_t(j)] = double(k[i]) * double(k_k[c]) * inv;
        dkk[size_t(j)] = -double(dalpha[i]) + double(dbeta[i]) * a;
        dot += kk[size_t(j)] * dkk[size_t(j)];
      }
      for (int64_t j = 0; j < N; ++j) {
        const int64_t c = h * N + j, i = o + c;
        // d(x / ‖x‖) = (dkk - kk (kk · dkk)) / ‖x‖ when the norm is above the clamp, dkk / 1e-12 below it.
        const double dx = norm > 1e-12 ? (dkk[size_t(j)] - kk[size_t(j)] * dot) * inv : dkk[size_t(j)] * inv;
        dk[i] += S(dx * double(k_k[c]));
        if (dk_k) dk_k[c] += S(dx * double(k[i]));
        const double a = 1.0 / (1.0 + std::exp(-(double(a0[c]) + double(al[i]))));
        const double da = double(dbeta[i]) * kk[size_t(j)] + double(dk_out[i]) * double(k[i]) * double(k_a[c]);
        dk[i] += S(double(dk_out[i]) * (1.0 + (a - 1.0) * double(k_a[c])));
        if (dk_a) dk_a[c] += S(double(dk_out[i]) * double(k[i]) * (a - 1.0));
        const double dza = da * a * (1.0 - a);
        dal[i] += S(dza);
        if (da0) da0[c] += S(dza);
        const double s = 1.0 / (1.0 + std::exp(-(double(w0[c]) + double(wl[i]))));
        const double wv = std::exp(c_w * s);
        const double dzw = double(dw[i]) * wv * c_w * s * (1.0 - s);
        dwl[i] += S(dzw);
        if (dw0) dw0[c] += S(dzw);
      }
    }
  }
}

// ---- §3 step 5: value residual ------------------------------------------------------------------
// out = v + (v_first - v) ⊙ σ(v0 + vg); all [T, C], v0 [C].
template <class S>
void value_residual_forward(const S* v, const S* v_first, const S* vg, const S* v0, S* out, int64_t T, int64_t C) {
  for (int64_t i = 0; i < T * C; ++i) {
    const S g = sigmoid_of(S(v0[i % C] + vg[i]));
    out[i] = v[i] + (v_first[i] - v[i]) * g;
  }
}
template <class S>
void value_residual_backward(const S* dout, const S* v, const S* v_first, const S* vg, const S* v0, S* dv,
                             S* dv_first, S* dvg, S* dv0, int64_t T, int64_t C) {
  for (int64_t i = 0; i < T * C; ++i) {
    const double g = 1.0 / (1.0 + std::exp(-(double(v0[i % C]) + double(vg[i]))));
    const double d = dout[i];
    dv[i] += S(d * (1.0 - g));
    dv_first[i] += S(d * g);
    const double dz = d * (double(v_first[i]) - double(v[i])) * g * (1.0 - g);
    dvg[i] += S(dz);
    if (dv0) dv0[i % C] += S(dz);
  }
}

// ---- §3 steps 8–9 and the gate of step 10 -------------------------------------------------------
// out = (GroupNorm_N(y; ln_w, ln_b, eps) + (Σ_j r_j k_j r_k[h, j]) v_h) ⊙ g, per head of N channels.
// mean, rstd [T, H] saved for the backward.
template <class S>
void rwkv7_output_forward(const S* y, const S* r, const S* k, const S* v, const S* r_k, const S* g, const S* ln_w,
                          const S* ln_b, double eps, S* out, S* mean, S* rstd, int64_t T, int64_t C, int64_t N) {
  group_norm_forward(y, ln_w, ln_b, out, mean, rstd, T, C, N, eps);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < C / N; ++h) {
      const int64_t o = t * C + h * N;
      double u = 0;
      for (int64_t j = 0; j < N; ++j) u += double(r[o + j]) * double(k[o + j]) * double(r_k[h * N + j]);
      for (int64_t i = 0; i < N; ++i) out[o + i] = S((double(out[o + i]) + u * double(v[o + i])) * double(g[o + i]));
    }
}
template <class S>
void rwkv7_output_backward(const S* dout, const S* y, const S* r, const S* k, const S* v, const S* r_k, const S* g,
                           const S* ln_w, const S* ln_b, const S* mean, const S* rstd, S* dy, S* dr, S* dk, S* dv,
                           S* dr_k, S* dg, S* dln_w, S* dln_b, int64_t T, int64_t C, int64_t N) {
  const int64_t H = C / N;
  std::vector<S> dgn(static_cast<size_t>(T * C));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t o = t * C + h * N;
      const double mu = mean[t * H + h], inv = rstd[t * H + h];
      double u = 0, du = 0;
      for (int64_t j = 0; j < N; ++j) u += double(r[o + j]) * double(k[o + j]) * double(r_k[h * N + j]);
      for (int64_t i = 0; i < N; ++i) {
        const int64_t c = h * N + i;
        const double gn = (double(y[o + i]) - mu) * inv * double(ln_w[c]) + double(ln_b[c]);
        const double d = dout[o + i];
        dg[o + i] += S(d * (gn + u * double(v[o + i])));
        dgn[size_t(o + i)] = S(d * double(g[o + i]));
        dv[o + i] += S(d * double(g[o + i]) * u);
        du += d * double(g[o + i]) * double(v[o + i]);
      }
      for (int64_t j = 0; j < N; ++j) {
        const double rk = r_k[h * N + j];
        dr[o + j] += S(du * double(k[o + j]) * rk);
        dk[o + j] += S(du * double(r[o + j]) * rk);
        if (dr_k) dr_k[h * N + j] += S(du * double(r[o + j]) * double(k[o + j]));
      }
    }
  group_norm_backward(dgn.data(), y, ln_w, mean, rstd, dy, dln_w, dln_b, T, C, N);
}

// ---- the whole time mix ------------------------------------------------------------------------------
// Parameter (or gradient) pointers of one RWKV-7 time mix, checkpoint names in the comments. P is
// `const S*` for weights and `S*` for gradients. v0, v1, v2 are null in block 0.
template <class P>
struct TimeMixTensors {
  P x_r, x_w, x_k, x_v, x_a, x_g;     // att.x_* [C]
  P w0, w1, w2, a0, a1, a2, v0, v1, v2;  // [C], [C, D], [D, C]
  P g1, g2, k_k, k_a, r_k;            // [C, Dg], [Dg, C], [C], [C], [H, N]
  P receptance, key, value, output;   // [C, C] Linear
  P ln_w, ln_b;                       // att.ln_x.weight / .bias [C]
};

struct TimeMixShape {
  int64_t T, C, N, dim_w, dim_a, dim_v, dim_g;
  bool first_block;  // block 0: publishes v_first instead of mixing towards it
};

// Everything the backward needs, each [T, C] unless noted.
template <class S>
struct TimeMixSaved {
  std::vector<S> delta, xr, xw, xk, xv, xa, xg;
  // hw [T, dim_w] (after tanh), ha [T, dim_a], hg [T, dim_g] (after σ)
  std::vector<S> r, k, v, hw, wl, ha, al, hg, gate;
  std::vector<S> decay, a, alpha, beta, k_out;
  std::vector<S> hv, vg, v_mixed;  // hv [T, dim_v]; empty in block 0
  Wkv7Saved<S> wkv;
  std::vector<S> y, ln_mean, ln_rstd, yo;  // yo: input of the output projection
};

// Ln GroupNorm eps of ln_x: 1e-5 · head_size_divisor² with the official divisor 8.
constexpr double kLnXEps = 64e-5;

// x: [T, C] ln1 output. v_first: block 0 writes it, later blocks read it. out: [T, C].
template <class S>
void time_mix_forward(const TimeMixTensors<const S*>& p, const TimeMixShape& sh, const S* x, S* v_first, S* out,
                      TimeMixSaved<S>& s, int64_t wkv_save_every = 16) {
  const int64_t T = sh.T, C = sh.C, N = sh.N, TC = T * C;
  auto mk = [](std::vector<S>& v, int64_t n) { v.assign(size_t(n), S(0)); };
  for (auto* v : {&s.delta, &s.xr, &s.xw, &s.xk, &s.xv, &s.xa, &s.xg, &s.r, &s.k, &s.v, &s.wl, &s.al, &s.gate,
                  &s.decay, &s.a, &s.alpha, &s.beta, &s.k_out, &s.y, &s.yo})
    mk(*v, TC);
  mk(s.hw, T * sh.dim_w), mk(s.ha, T * sh.dim_a), mk(s.hg, T * sh.dim_g);
  mk(s.ln_mean, T * (C / N)), mk(s.ln_rstd, T * (C / N));
  token_shift_forward(x, static_cast<const S*>(nullptr), s.delta.data(), T, C);
  shift_mix_forward(x, s.delta.data(), p.x_r, s.xr.data(), T, C);
  shift_mix_forward(x, s.delta.data(), p.x_w, s.xw.data(), T, C);
  shift_mix_forward(x, s.delta.data(), p.x_k, s.xk.data(), T, C);
  shift_mix_forward(x, s.delta.data(), p.x_v, s.xv.data(), T, C);
  shift_mix_forward(x, s.delta.data(), p.x_a, s.xa.data(), T, C);
  shift_mix_forward(x, s.delta.data(), p.x_g, s.xg.data(), T, C);
  linear_forward(s.xr.data(), p.receptance, s.r.data(), T, C, C);
  linear_forward(s.xk.data(), p.key, s.k.data(), T, C, C);
  linear_forward(s.xv.data(), p.value, s.v.data(), T, C, C);
  matmul_forward(s.xw.data(), p.w1, s.hw.data(), T, C, sh.dim_w);
  tanh_forward(s.hw.data(), s.hw.data(), T * sh.dim_w);
  matmul_forward(s.hw.data(), p.w2, s.wl.data(), T, sh.dim_w, C);
  matmul_forward(s.xa.data(), p.a1, s.ha.data(), T, C, sh.dim_a);
  matmul_forward(s.ha.data(), p.a2, s.al.data(), T, sh.dim_a, C);
  matmul_forward(s.xg.data(), p.g1, s.hg.data(), T, C, sh.dim_g);
  sigmoid_forward(s.hg.data(), s.hg.data(), T * sh.dim_g);
  matmul_forward(s.hg.data(), p.g2, s.gate.data(), T, sh.dim_g, C);
  wkv_inputs_forward(s.wl.data(), s.al.data(), s.k.data(), p.w0, p.a0, p.k_k, p.k_a, s.decay.data(), s.a.data(),
                     s.alpha.data(), s.beta.data(), s.k_out.data(), T, C, N);
  const S* v_used = s.v.data();
  if (sh.first_block) {
    std::copy(s.v.begin(), s.v.end(), v_first);
    s.hv.clear(), s.vg.clear(), s.v_mixed.clear();
  } else {
    mk(s.hv, T * sh.dim_v), mk(s.vg, TC), mk(s.v_mixed, TC);
    matmul_forward(s.xv.data(), p.v1, s.hv.data(), T, C, sh.dim_v);
    matmul_forward(s.hv.data(), p.v2, s.vg.data(), T, sh.dim_v, C);
    value_residual_forward(s.v.data(), v_first, s.vg.data(), p.v0, s.v_mixed.data(), T, C);
    v_used = s.v_mixed.data();
  }
  std::vector<S> state(size_t(C * N), S(0));
  s.wkv.save_every = wkv_save_every;
  wkv7_forward(s.r.data(), s.decay.data(), s.k_out.data(), v_used, s.alpha.data(), s.beta.data(), state.data(),
               s.y.data(), T, C / N, N, &s.wkv);
  rwkv7_output_forward(s.y.data(), s.r.data(), s.k_out.data(), v_used, p.r_k, s.gate.data(), p.ln_w, p.ln_b,
                       kLnXEps, s.yo.data(), s.ln_mean.data(), s.ln_rstd.data(), T, C, N);
  linear_forward(s.yo.data(), p.output, out, T, C, C);
}

// dout [T, C] → dx [T, C] (added), parameter gradients (added), and v_first: block 0 READS dv_first
// (the gradient the later blocks accumulated into it) and adds it to its v; later blocks ADD into it.
template <class S>
void time_mix_backward(const TimeMixTensors<const S*>& p, const TimeMixTensors<S*>& g, const TimeMixShape& sh,
                       const S* x, const S* v_first, const TimeMixSaved<S>& s, const S* dout, S* dx, S* dv_first) {
  const int64_t T = sh.T, C = sh.C, N = sh.N, TC = T * C;
  auto z = [](int64_t n) { return std::vector<S>(size_t(n), S(0)); };
  std::vector<S> dyo = z(TC), dy = z(TC), dr = z(TC), dk_out = z(TC), dv_used = z(TC), dgate = z(TC);
  linear_backward(dout, s.yo.data(), p.output, dyo.data(), g.output, T, C, C);
  const S* v_used = sh.first_block ? s.v.data() : s.v_mixed.data();
  rwkv7_output_backward(dyo.data(), s.y.data(), s.r.data(), s.k_out.data(), v_used, p.r_k, s.gate.data(), p.ln_w,
                        p.ln_b, s.ln_mean.data(), s.ln_rstd.data(), dy.data(), dr.data(), dk_out.data(),
                        dv_used.data(), g.r_k, dgate.data(), g.ln_w, g.ln_b, T, C, N);
  std::vector<S> ddecay = z(TC), dalpha = z(TC), dbeta = z(TC);
  wkv7_backward(dy.data(), s.r.data(), s.decay.data(), s.k_out.data(), v_used, s.alpha.data(), s.beta.data(), s.wkv,
                dr.data(), ddecay.data(), dk_out.data(), dv_used.data(), dalpha.data(), dbeta.data(), T, C / N, N);
  std::vector<S> dxr = z(TC), dxw = z(TC), dxk = z(TC), dxv = z(TC), dxa = z(TC), dxg = z(TC);
  std::vector<S> dv = z(TC);
  if (sh.first_block) {
    for (int64_t i = 0; i < TC; ++i) dv[size_t(i)] = dv_used[size_t(i)] + dv_first[i];
  } else {
    std::vector<S> dvg = z(TC), dhv = z(T * sh.dim_v);
    value_residual_backward(dv_used.data(), s.v.data(), v_first, s.vg.data(), p.v0, dv.data(), dv_first, dvg.data(),
                            g.v0, T, C);
    matmul_backward(dvg.data(), s.hv.data(), p.v2, dhv.data(), g.v2, T, sh.dim_v, C);
    matmul_backward(dhv.data(), s.xv.data(), p.v1, dxv.data(), g.v1, T, C, sh.dim_v);
  }
  std::vector<S> dwl = z(TC), dal = z(TC), dk = z(TC);
  wkv_inputs_backward(ddecay.data(), dalpha.data(), dbeta.data(), dk_out.data(), s.wl.data(), s.al.data(),
                      s.k.data(), p.w0, p.a0, p.k_k, p.k_a, dwl.data(), dal.data(), dk.data(), g.w0, g.a0, g.k_k,
                      g.k_a, T, C, N);
  // Low-rank branches: decay (tanh inside), rate (linear), gate (σ inside).
  std::vector<S> dhw = z(T * sh.dim_w), dhw_pre = z(T * sh.dim_w);
  matmul_backward(dwl.data(), s.hw.data(), p.w2, dhw.data(), g.w2, T, sh.dim_w, C);
  tanh_backward(dhw.data(), s.hw.data(), dhw_pre.data(), T * sh.dim_w);
  matmul_backward(dhw_pre.data(), s.xw.data(), p.w1, dxw.data(), g.w1, T, C, sh.dim_w);
  std::vector<S> dha = z(T * sh.dim_a);
  matmul_backward(dal.data(), s.ha.data(), p.a2, dha.data(), g.a2, T, sh.dim_a, C);
  matmul_backward(dha.data(), s.xa.data(), p.a1, dxa.data(), g.a1, T, C, sh.dim_a);
  std::vector<S> dhg = z(T * sh.dim_g), dhg_pre = z(T * sh.dim_g);
  matmul_backward(dgate.data(), s.hg.data(), p.g2, dhg.data(), g.g2, T, sh.dim_g, C);
  sigmoid_backward(dhg.data(), s.hg.data(), dhg_pre.data(), T * sh.dim_g);
  matmul_backward(dhg_pre.data(), s.xg.data(), p.g1, dxg.data(), g.g1, T, C, sh.dim_g);
  linear_backward(dr.data(), s.xr.data(), p.receptance, dxr.data(), g.receptance, T, C, C);
  linear_backward(dk.data(), s.xk.data(), p.key, dxk.data(), g.key, T, C, C);
  linear_backward(dv.data(), s.xv.data(), p.value, dxv.data(), g.value, T, C, C);
  std::vector<S> ddelta = z(TC);
  shift_mix_backward(dxr.data(), s.delta.data(), p.x_r, dx, ddelta.data(), g.x_r, T, C);
  shift_mix_backward(dxw.data(), s.delta.data(), p.x_w, dx, ddelta.data(), g.x_w, T, C);
  shift_mix_backward(dxk.data(), s.delta.data(), p.x_k, dx, ddelta.data(), g.x_k, T, C);
  shift_mix_backward(dxv.data(), s.delta.data(), p.x_v, dx, ddelta.data(), g.x_v, T, C);
  shift_mix_backward(dxa.data(), s.delta.data(), p.x_a, dx, ddelta.data(), g.x_a, T, C);
  shift_mix_backward(dxg.data(), s.delta.data(), p.x_g, dx, ddelta.data(), g.x_g, T, C);
  token_shift_backward(ddelta.data(), dx, T, C);
  (void)x;
}

}  // namespace rwkvx::train
