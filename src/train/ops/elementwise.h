// Training ops: elementwise activations, the token shift and its lerp (spec model.md §3 step 1, §4);
// forward and backward side by side. Backward functions ADD into their outputs.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>


namespace rwkvx::train {

template <class S>
S sigmoid_of(S x) {
  return S(1.0 / (1.0 + std::exp(-double(x))));
}

// y = tanh(x); dx += dy (1 - y²).
template <class S>
void tanh_forward(const S* x, S* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = std::tanh(x[i]);
}
template <class S>
void tanh_backward(const S* dy, const S* y, S* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] += dy[i] * (S(1) - y[i] * y[i]);
}

// y = σ(x); dx += dy y (1 - y).
template <class S>
void sigmoid_forward(const S* x, S* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = sigmoid_of(x[i]);
}
template <class S>
void sigmoid_backward(const S* dy, const S* y, S* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] += dy[i] * y[i] * (S(1) - y[i]);
}

// y = max(x, 0)²; dx += 2 dy max(x, 0).
template <class S>
void relu_square_forward(const S* x, S* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const S r = std::max(x[i], S(0));
    y[i] = r * r;
  }
}
template <class S>
void relu_square_backward(const S* dy, const S* x, S* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] += S(2) * dy[i] * std::max(x[i], S(0));
}

// Token shift of one sequence: delta[t] = x[t-1] - x[t], with x[-1] = prev0 (null: zero, a fresh
// sequence). x, delta: [T, C]; prev0: [C]. The carried state is not differentiated (training starts
// every sequence from a zero state).
template <class S>
void token_shift_forward(const S* x, const S* prev0, S* delta, int64_t T, int64_t C) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      const S prev = t > 0 ? x[(t - 1) * C + c] : prev0 ? prev0[c] : S(0);
      delta[t * C + c] = prev - x[t * C + c];
    }
}
// dx[t] -= ddelta[t];  dx[t-1] += ddelta[t].
template <class S>
void token_shift_backward(const S* ddelta, S* dx, int64_t T, int64_t C) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      dx[t * C + c] -= ddelta[t * C + c];
      if (t > 0) dx[(t - 1) * C + c] += ddelta[t * C + c];
    }
}

// out = x + delta ⊙ mu (mu [C]).
template <class S>
void shift_mix_forward(const S* x, const S* delta, const S* mu, S* out, int64_t T, int64_t C) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) out[t * C + c] = x[t * C + c] + delta[t * C + c] * mu[c];
}
// dx += dout;  ddelta += dout ⊙ mu;  dmu += Σ_t dout ⊙ delta.
template <class S>
void shift_mix_backward(const S* dout, const S* delta, const S* mu, S* dx, S* ddelta, S* dmu, int64_t T,
                        int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    double acc = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = t * C + c;
      if (dx) dx[i] += dout[i];
      if (ddelta) ddelta[i] += dout[i] * mu[c];
      acc += double(dout[i]) * double(delta[i]);
    }
    if (dmu) dmu[c] += S(acc);
  }
}

}  // namespace rwkvx::train
