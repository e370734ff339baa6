// Training ops: dense projections, forward and backward side by side (spec model.md §3 step 2, §4, §5).
// Two layouts, as stored in checkpoints: `linear` takes W [out, in] (torch Linear, y = x Wᵀ) and
// `matmul` takes W [in, out] (the RWKV-7 low-rank matrices, y = x W). Templated on the scalar: float
// (training) goes to the threaded fp32 GEMM of fast.h; double (gradient checks) runs the plain loops
// below, which accumulate every dot product in double and are the oracle the fast path is tested against.
// Backward functions ADD into their outputs (callers zero them once); a null output is skipped.
#pragma once
#include <cstdint>
#include <type_traits>
#include <vector>

#include "train/ops/fast.h"

namespace rwkvx::train {

// y[T, out] = x[T, in] @ W[out, in]ᵀ. Four outputs at a time: four independent sums (each in the
// reference's order, so the result is the same) instead of one latency-bound chain.
// GCC 12, inlining the double version into callers with constant sizes, warns that the remainder loop
// would overflow at an iteration it never reaches (-Waggressive-loop-optimizations); a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Waggressive-loop-optimizations"
#endif
template <class S>
void linear_forward(const S* x, const S* W, S* y, int64_t T, int64_t in, int64_t out) {
  if constexpr (std::is_same_v<S, float>) {
    return fast::gemm(false, true, T, out, in, x, in, W, in, y, out, false);
  }
  for (int64_t t = 0; t < T; ++t) {
    const S* xi = x + t * in;
    int64_t o = 0;
    for (; o + 4 <= out; o += 4) {
      const S *w0 = W + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
      double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (int64_t i = 0; i < in; ++i) {
        const double xv = xi[i];
        a0 += xv * double(w0[i]), a1 += xv * double(w1[i]), a2 += xv * double(w2[i]), a3 += xv * double(w3[i]);
      }
      y[t * out + o] = S(a0), y[t * out + o + 1] = S(a1), y[t * out + o + 2] = S(a2), y[t * out + o + 3] = S(a3);
    }
    for (; o < out; ++o) {
      const S* wr = W + o * in;
      double acc = 0;
      for (int64_t i = 0; i < in; ++i) acc += double(xi[i]) * double(wr[i]);
      y[t * out + o] = S(acc);
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// dx[T, in] += dy @ W;  dW[out, in] += dyᵀ @ x.
template <class S>
void linear_backward(const S* dy, const S* x, const S* W, S* dx, S* dW, int64_t T, int64_t in, int64_t out) {
  if constexpr (std::is_same_v<S, float>) {
    if (dx) fast::gemm(false, false, T, in, out, dy, out, W, in, dx, in, true);
    if (dW) fast::gemm(true, false, out, in, T, dy, out, x, in, dW, in, true);
    return;
  }
  std::vector<double> acc(static_cast<size_t>(in));
  if (dx) {
    for (int64_t t = 0; t < T; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t o = 0; o < out; ++o) {
        const double g = dy[t * out + o];
        if (g == 0) continue;
        const S* wr = W + o * in;
        for (int64_t i = 0; i < in; ++i) acc[size_t(i)] += g * double(wr[i]);
      }
      for (int64_t i = 0; i < in; ++i) dx[t * in + i] += S(acc[size_t(i)]);
    }
  }
  if (dW) {
    for (int64_t o = 0; o < out; ++o) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t t = 0; t < T; ++t) {
        const double g = dy[t * out + o];
        if (g == 0) continue;
        const S* xi = x + t * in;
        for (int64_t i = 0; i < in; ++i) acc[size_t(i)] += g * double(xi[i]);
      }
      for (int64_t i = 0; i < in; ++i) dW[o * in + i] += S(acc[size_t(i)]);
    }
  }
}

// y[T, out] = x[T, in] @ W[in, out].
template <class S>
void matmul_forward(const S* x, const S* W, S* y, int64_t T, int64_t in, int64_t out) {
  if constexpr (std::is_same_v<S, float>) {
    return fast::gemm(false, false, T, out, in, x, in, W, out, y, out, false);
  }
  std::vector<double> acc(static_cast<size_t>(out));
  for (int64_t t = 0; t < T; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t i = 0; i < in; ++i) {
      const double xv = x[t * in + i];
      const S* wr = W + i * out;
      for (int64_t o = 0; o < out; ++o) acc[size_t(o)] += xv * double(wr[o]);
    }
    for (int64_t o = 0; o < out; ++o) y[t * out + o] = S(acc[size_t(o)]);
  }
}

// dx[T, in] += dy @ Wᵀ;  dW[in, out] += xᵀ @ dy.
template <class S>
void matmul_backward(const S* dy, const S* x, const S* W, S* dx, S* dW, int64_t T, int64_t in, int64_t out) {
  if constexpr (std::is_same_v<S, float>) {
    if (dx) fast::gemm(false, true, T, in, out, dy, out, W, out, dx, in, true);
    if (dW) fast::gemm(true, false, in, out, T, x, in, dy, out, dW, out, true);
    return;
  }
  if (dx) {
    for (int64_t t = 0; t < T; ++t) {
      const S* g = dy + t * out;
      for (int64_t i = 0; i < in; ++i) {
        const S* wr = W + i * out;
        double acc = 0;
        for (int64_t o = 0; o < out; ++o) acc += double(g[o]) * double(wr[o]);
        dx[t * in + i] += S(acc);
      }
    }
  }
  if (dW) {
    std::vector<double> acc(static_cast<size_t>(in * out), 0.0);
    for (int64_t t = 0; t < T; ++t) {
      const S* g = dy + t * out;
      for (int64_t i = 0; i < in; ++i) {
        const double xv = x[t * in + i];
        if (xv == 0) continue;
        double* a = acc.data() + i * out;
        for (int64_t o = 0; o < out; ++o) a[o] += xv * double(g[o]);
      }
    }
    for (int64_t i = 0; i < in * out; ++i) dW[i] += S(acc[size_t(i)]);
  }
}

}  // namespace rwkvx::train
