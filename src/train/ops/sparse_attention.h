// Training op: top-k chunk sparse attention (MoBA, spec model.md §5) over one sequence from position 0,
// forward and backward side by side, and the attention half of the sparse block (q/k/v projections,
// attention, output projection).
//
// Gradient semantics follow the official training code (MoonshotAI MoBA `moba_efficient.py`, used by
// RWKV-X `pretrain/src/moba_efficient.py`): the chunk means and gate scores only choose the chunks
// (top-k indices turned into a mask), so no gradient flows through the selection; gradients flow
// through the softmax and into the queries, and the keys and values of every attended position (the
// selected chunks and the causal own chunk), exactly as flash-attention's backward over that mask.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "core/error.h"
#include "train/ops/linear.h"
#include "train/ops/parallel.h"

namespace rwkvx::train {

struct MobaShape {
  int64_t T, C, D;  // tokens, channels, head dim (heads = C / D)
  int64_t chunk;    // c
  int64_t top_k;    // k: own chunk + top-(k-1) past complete chunks, per head
};

template <class S>
struct MobaSaved {
  std::vector<int32_t> selected;  // [T, H, k-1]: chosen past chunks (ascending), -1 where fewer exist
  std::vector<double> lse;        // [T, H]: log Σ exp of the scaled logits over the attended positions
};

namespace detail {

// The attended key positions of (t, h), ascending: the selected chunks, then own-chunk positions ≤ t.
inline void moba_keys(const int32_t* sel, int64_t n_sel, int64_t t, int64_t chunk, std::vector<int64_t>& keys) {
  keys.clear();
  for (int64_t i = 0; i < n_sel; ++i) {
    if (sel[i] < 0) continue;
    for (int64_t s = int64_t(sel[i]) * chunk; s < int64_t(sel[i] + 1) * chunk; ++s) keys.push_back(s);
  }
  for (int64_t s = t / chunk * chunk; s <= t; ++s) keys.push_back(s);
}

}  // namespace detail

// q, k, v, out: [T, C]. Chunk means of k are taken over complete chunks (double sum, rounded to S, as the
// reference backend stores them); the gate q·mean is unscaled; top-(k-1) per head, ties to the lower
// chunk. One softmax(q·k/√D) over the union of the chosen chunks and the causal own chunk.
template <class S>
void moba_forward(const S* q, const S* k, const S* v, S* out, const MobaShape& sh, MobaSaved<S>& saved) {
  const int64_t T = sh.T, C = sh.C, D = sh.D, H = C / D, c = sh.chunk, K1 = sh.top_k - 1;
  RWKVX_ASSERT(C % D == 0 && c > 0 && sh.top_k >= 1, "moba: bad shape");
  const int64_t n_chunks = T / c;
  std::vector<S> mean(static_cast<size_t>(n_chunks * C));
  for (int64_t n = 0; n < n_chunks; ++n)
    for (int64_t ch = 0; ch < C; ++ch) {
      double sum = 0;
      for (int64_t s = n * c; s < (n + 1) * c; ++s) sum += double(k[s * C + ch]);
      mean[size_t(n * C + ch)] = S(sum / double(c));
    }
  saved.selected.assign(size_t(T * H * std::max<int64_t>(K1, 0)), -1);
  saved.lse.assign(size_t(T * H), 0.0);
  const double scale = 1.0 / std::sqrt(double(D));
  // Every (query, head) is independent: tasks of kMobaRows queries of one head (op threads, parallel.h).
  constexpr int64_t kMobaRows = 32;
  const int64_t pieces = n_pieces(T, kMobaRows);
  parallel_tasks(pieces * H, double(T) * double(std::min(T, sh.top_k * c)) * double(C), [&](int64_t task) {
    const int64_t h = task / pieces, t0 = task % pieces * kMobaRows;
    std::vector<double> score, logit, acc(static_cast<size_t>(D));
    std::vector<int64_t> order, keys;
    for (int64_t t = t0; t < std::min(T, t0 + kMobaRows); ++t) {
      const int64_t j = t / c;
      const S* qh = q + t * C + h * D;
      score.assign(size_t(j), 0.0);
      for (int64_t n = 0; n < j; ++n) {
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += double(qh[d]) * double(mean[size_t(n * C + h * D + d)]);
        score[size_t(n)] = s;
      }
      order.resize(size_t(j));
      std::iota(order.begin(), order.end(), 0);
      const int64_t n_sel = std::min(K1, j);
      std::partial_sort(order.begin(), order.begin() + n_sel, order.end(), [&](int64_t a, int64_t b) {
        return score[size_t(a)] != score[size_t(b)] ? score[size_t(a)] > score[size_t(b)] : a < b;
      });
      std::sort(order.begin(), order.begin() + n_sel);
      int32_t* sel = saved.selected.data() + (t * H + h) * K1;
      for (int64_t i = 0; i < n_sel; ++i) sel[i] = int32_t(order[size_t(i)]);
      detail::moba_keys(sel, K1, t, c, keys);
      logit.resize(keys.size());
      double mx = -INFINITY;
      for (size_t i = 0; i < keys.size(); ++i) {
        const S* kr = k + keys[i] * C + h * D;
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += double(qh[d]) * double(kr[d]);
        logit[i] = s * scale;
        mx = std::max(mx, logit[i]);
      }
      double denom = 0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (size_t i = 0; i < keys.size(); ++i) {
        const double e = std::exp(logit[i] - mx);
        denom += e;
        const S* vr = v + keys[i] * C + h * D;
        for (int64_t d = 0; d < D; ++d) acc[size_t(d)] += e * double(vr[d]);
      }
      saved.lse[size_t(t * H + h)] = mx + std::log(denom);
      for (int64_t d = 0; d < D; ++d) out[t * C + h * D + d] = S(acc[size_t(d)] / denom);
    }
  });
}

// dout [T, C] → dq, dk, dv (added). With p_s = exp(q·k_s/√D - lse) over the attended positions:
//   dv_s += p_s dout;  dl_s = p_s (dout·v_s - dout·o);  dq += Σ_s dl_s k_s / √D;  dk_s += dl_s q / √D.
// o is recomputed from p and v (so the rounding of the saved output does not enter the gradient).
template <class S>
void moba_backward(const S* dout, const S* q, const S* k, const S* v, const MobaShape& sh, const MobaSaved<S>& saved,
                   S* dq, S* dk, S* dv) {
  const int64_t T = sh.T, C = sh.C, D = sh.D, H = C / D, c = sh.chunk, K1 = sh.top_k - 1;
  const double scale = 1.0 / std::sqrt(double(D));
  // One task per head: dk and dv rows sum over queries, so a head's queries stay in order on one thread.
  parallel_tasks(H, double(T) * double(std::min(T, sh.top_k * c)) * double(C) * 2, [&](int64_t h) {
    std::vector<int64_t> keys;
    std::vector<double> p, o(static_cast<size_t>(D)), gq(static_cast<size_t>(D));
    for (int64_t t = 0; t < T; ++t) {
      const S* qh = q + t * C + h * D;
      const S* go = dout + t * C + h * D;
      detail::moba_keys(saved.selected.data() + (t * H + h) * K1, K1, t, c, keys);
      const double lse = saved.lse[size_t(t * H + h)];
      p.resize(keys.size());
      std::fill(o.begin(), o.end(), 0.0);
      for (size_t i = 0; i < keys.size(); ++i) {
        const S* kr = k + keys[i] * C + h * D;
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += double(qh[d]) * double(kr[d]);
        p[i] = std::exp(s * scale - lse);
        const S* vr = v + keys[i] * C + h * D;
        for (int64_t d = 0; d < D; ++d) o[size_t(d)] += p[i] * double(vr[d]);
      }
      double go_o = 0;
      for (int64_t d = 0; d < D; ++d) go_o += double(go[d]) * o[size_t(d)];
      std::fill(gq.begin(), gq.end(), 0.0);
      for (size_t i = 0; i < keys.size(); ++i) {
        const S* kr = k + keys[i] * C + h * D;
        const S* vr = v + keys[i] * C + h * D;
        double go_v = 0;
        for (int64_t d = 0; d < D; ++d) go_v += double(go[d]) * double(vr[d]);
        const double dl = p[i] * (go_v - go_o) * scale;
        S* dvr = dv + keys[i] * C + h * D;
        S* dkr = dk + keys[i] * C + h * D;
        for (int64_t d = 0; d < D; ++d) {
          dvr[d] += S(p[i] * double(go[d]));
          dkr[d] += S(dl * double(qh[d]));
          gq[size_t(d)] += dl * double(kr[d]);
        }
      }
      for (int64_t d = 0; d < D; ++d) dq[t * C + h * D + d] += S(gq[size_t(d)]);
    }
  });
}

// ---- the attention half of a sparse block ------------------------------------------------------------
template <class P>
struct SparseAttnTensors {
  P query, key, value, output;  // moba.M.att.{receptance,key,value,output}.weight [C, C]
};

template <class S>
struct SparseAttnSaved {
  std::vector<S> q, k, v, o;
  MobaSaved<S> moba;
};

// x: [T, C] ln1 output; out: [T, C].
template <class S>
void sparse_attn_forward(const SparseAttnTensors<const S*>& p, const MobaShape& sh, const S* x, S* out,
                         SparseAttnSaved<S>& s) {
  const int64_t T = sh.T, C = sh.C;
  for (auto* b : {&s.q, &s.k, &s.v, &s.o}) b->assign(size_t(T * C), S(0));
  linear_forward(x, p.query, s.q.data(), T, C, C);
  linear_forward(x, p.key, s.k.data(), T, C, C);
  linear_forward(x, p.value, s.v.data(), T, C, C);
  moba_forward(s.q.data(), s.k.data(), s.v.data(), s.o.data(), sh, s.moba);
  linear_forward(s.o.data(), p.output, out, T, C, C);
}

template <class S>
void sparse_attn_backward(const SparseAttnTensors<const S*>& p, const SparseAttnTensors<S*>& g, const MobaShape& sh,
                          const S* x, const SparseAttnSaved<S>& s, const S* dout, S* dx) {
  const int64_t T = sh.T, C = sh.C;
  std::vector<S> dO(size_t(T * C), S(0)), dq(size_t(T * C), S(0)), dk(size_t(T * C), S(0)), dv(size_t(T * C), S(0));
  linear_backward(dout, s.o.data(), p.output, dO.data(), g.output, T, C, C);
  moba_backward(dO.data(), s.q.data(), s.k.data(), s.v.data(), sh, s.moba, dq.data(), dk.data(), dv.data());
  linear_backward(dq.data(), x, p.query, dx, g.query, T, C, C);
  linear_backward(dk.data(), x, p.key, dx, g.key, T, C, C);
  linear_backward(dv.data(), x, p.value, dx, g.value, T, C, C);
}

}  // namespace rwkvx::train
