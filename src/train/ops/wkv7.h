// Training op: the WKV-7 recurrence (spec model.md §3 step 7), forward and backward side by side.
// Per head h, state S ∈ ℝ^{N×N} (rows i = value index, columns j = key index), one token t at a time:
//   sa_i = Σ_j S_ij α_j;   S_ij ← S_ij w_j + sa_i β_j + v_i k_j;   y_i = Σ_j S_ij r_j
// The forward keeps a snapshot of the state every `save_every` tokens (the official CUDA kernel's
// CHUNK_LEN is 16); the backward recomputes the states inside one segment from its snapshot, so memory
// is T/save_every states plus one segment, not T states. The float forward rounds the state to float
// after every token and accumulates dot products in double, exactly as the reference backend does.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "train/ops/parallel.h"

namespace rwkvx::train {

template <class S>
struct Wkv7Saved {
  int64_t save_every = 16;
  std::vector<S> snapshots;  // [ceil(T / save_every), H, N, N]: the state before token n·save_every
};

namespace detail {

// One token of one head: advances S (N×N) in place and writes y. `sa` is scratch [N].
template <class S>
void wkv7_step(S* st, const S* r, const S* w, const S* k, const S* v, const S* a, const S* b, S* y, int64_t N,
               double* sa) {
  for (int64_t i = 0; i < N; ++i) {
    double acc = 0;
    for (int64_t j = 0; j < N; ++j) acc += double(st[i * N + j]) * double(a[j]);
    sa[i] = acc;
  }
  for (int64_t i = 0; i < N; ++i) {
    double acc = 0;
    for (int64_t j = 0; j < N; ++j) {
      S& s = st[i * N + j];
      s = S(double(s) * double(w[j]) + sa[i] * double(b[j]) + double(v[i]) * double(k[j]));
      acc += double(s) * double(r[j]);
    }
    if (y) y[i] = S(acc);
  }
}

}  // namespace detail

// r, w, k, v, alpha, beta, y: [T, H·N]. state: [H, N, N], in = the state before token 0 (zero for a
// fresh sequence), out = the state after the last token. saved: filled when not null.
template <class S>
void wkv7_forward(const S* r, const S* w, const S* k, const S* v, const S* alpha, const S* beta, S* state, S* y,
                  int64_t T, int64_t H, int64_t N, Wkv7Saved<S>* saved) {
  const int64_t C = H * N, NN = N * N, HNN = H * NN;
  if (saved) {
    RWKVX_ASSERT(saved->save_every > 0, "wkv7: save_every must be positive");
    saved->snapshots.assign(size_t((T + saved->save_every - 1) / saved->save_every * HNN), S(0));
  }
  // Heads are independent: one task per head (op threads, parallel.h).
  parallel_tasks(H, double(T) * double(H) * double(NN) * 3, [&](int64_t h) {
    std::vector<double> sa(static_cast<size_t>(N));
    S* st = state + h * NN;
    for (int64_t t = 0; t < T; ++t) {
      if (saved && t % saved->save_every == 0)
        std::copy(st, st + NN, saved->snapshots.begin() + ((t / saved->save_every) * H + h) * NN);
      const int64_t o = t * C + h * N;
      detail::wkv7_step(st, r + o, w + o, k + o, v + o, alpha + o, beta + o, y + o, N, sa.data());
    }
  });
}

// Given dy [T, H·N], ADDs into dr, dw, dk, dv, dalpha, dbeta. With S_{t-1} the state before token t,
// S_t after it, and dS the gradient w.r.t. S_t (from later tokens):
//   dS += dy rᵀ;  dr_j = Σ_i S_t,ij dy_i;  dv_i = Σ_j dS_ij k_j;  dk_j = Σ_i dS_ij v_i;
//   dβ_j = Σ_i dS_ij sa_i;  dsa_i = Σ_j dS_ij β_j;  dw_j = Σ_i dS_ij S_{t-1},ij;  dα_j = Σ_i dsa_i S_{t-1},ij;
//   dS_{t-1} = dS ⊙ w (per column) + dsa αᵀ.
// The gradient w.r.t. the initial state is not produced (training starts from zero).
template <class S>
void wkv7_backward(const S* dy, const S* r, const S* w, const S* k, const S* v, const S* alpha, const S* beta,
                   const Wkv7Saved<S>& saved, S* dr, S* dw, S* dk, S* dv, S* dalpha, S* dbeta, int64_t T, int64_t H,
                   int64_t N) {
  const int64_t C = H * N, NN = N * N, L = saved.save_every;
  const int64_t n_seg = (T + L - 1) / L;
  RWKVX_ASSERT(int64_t(saved.snapshots.size()) == n_seg * H * NN, "wkv7_backward: snapshots do not match T");
  // One task per head (op threads, parallel.h); each writes only its head's columns.
  parallel_tasks(H, double(T) * double(H) * double(NN) * 10, [&](int64_t h) {
    std::vector<double> sa(static_cast<size_t>(N)), dsa(static_cast<size_t>(N));
    std::vector<double> dS(static_cast<size_t>(NN), 0.0);
    // states[(u + 1)·NN]: state after token t0 + u; states[0..NN): the snapshot before t0.
    std::vector<S> states(static_cast<size_t>((L + 1) * NN));
    for (int64_t seg = n_seg - 1; seg >= 0; --seg) {
      const int64_t t0 = seg * L, t1 = std::min(T, t0 + L);
      const S* snap = saved.snapshots.data() + (seg * H + h) * NN;
      std::copy(snap, snap + NN, states.begin());
      for (int64_t t = t0; t < t1; ++t) {
        S* st = states.data() + (t - t0 + 1) * NN;
        std::copy(st - NN, st, st);
        const int64_t o = t * C + h * N;
        detail::wkv7_step(st, r + o, w + o, k + o, v + o, alpha + o, beta + o, static_cast<S*>(nullptr), N,
                          sa.data());
      }
      for (int64_t t = t1 - 1; t >= t0; --t) {
        const S* prev = states.data() + (t - t0) * NN;
        const S* cur = prev + NN;
        const int64_t o = t * C + h * N;
        for (int64_t i = 0; i < N; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < N; ++j) acc += double(prev[i * N + j]) * double(alpha[o + j]);
          sa[size_t(i)] = acc;
        }
        for (int64_t i = 0; i < N; ++i)
          for (int64_t j = 0; j < N; ++j) dS[size_t(i * N + j)] += double(dy[o + i]) * double(r[o + j]);
        for (int64_t j = 0; j < N; ++j) {
          double a_r = 0, a_k = 0, a_b = 0, a_w = 0;
          for (int64_t i = 0; i < N; ++i) {
            const double g = dS[size_t(i * N + j)];
            a_r += double(cur[i * N + j]) * double(dy[o + i]);
            a_k += g * double(v[o + i]);
            a_b += g * sa[size_t(i)];
            a_w += g * double(prev[i * N + j]);
          }
          dr[o + j] += S(a_r);
          dk[o + j] += S(a_k);
          dbeta[o + j] += S(a_b);
          dw[o + j] += S(a_w);
        }
        for (int64_t i = 0; i < N; ++i) {
          double a_v = 0, a_s = 0;
          for (int64_t j = 0; j < N; ++j) {
            a_v += dS[size_t(i * N + j)] * double(k[o + j]);
            a_s += dS[size_t(i * N + j)] * double(beta[o + j]);
          }
          dv[o + i] += S(a_v);
          dsa[size_t(i)] = a_s;
        }
        for (int64_t j = 0; j < N; ++j) {
          double acc = 0;
          for (int64_t i = 0; i < N; ++i) acc += dsa[size_t(i)] * double(prev[i * N + j]);
          dalpha[o + j] += S(acc);
        }
        for (int64_t i = 0; i < N; ++i)
          for (int64_t j = 0; j < N; ++j)
            dS[size_t(i * N + j)] = dS[size_t(i * N + j)] * double(w[o + j]) + dsa[size_t(i)] * double(alpha[o + j]);
      }
    }
  });
}

}  // namespace rwkvx::train
