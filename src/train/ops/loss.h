// Training losses (spec system.md §4.4): cross-entropy per position, the L2Wrap gradient, and the LongCE
// window plan and weights. Logits are [T, V] row-major; targets < 0 are ignored (SFT labels -100, pads).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace rwkvx::train {

// loss[t] = logsumexp(logits[t]) - logits[t, target[t]] in double (0 for ignored targets).
// lse[t] is saved for the backward.
template <class S>
void cross_entropy_forward(const S* logits, const int32_t* targets, int64_t T, int64_t V, double* loss,
                           double* lse) {
  for (int64_t t = 0; t < T; ++t) {
    const S* l = logits + t * V;
    double mx = -INFINITY;
    for (int64_t i = 0; i < V; ++i) mx = std::max(mx, double(l[i]));
    double sum = 0;
    for (int64_t i = 0; i < V; ++i) sum += std::exp(double(l[i]) - mx);
    lse[t] = mx + std::log(sum);
    loss[t] = targets[t] < 0 ? 0.0 : lse[t] - double(l[targets[t]]);
  }
}

// dlogits[t] += coef[t] (softmax(logits[t]) - onehot(target[t])), skipping ignored targets.
template <class S>
void cross_entropy_backward(const S* logits, const int32_t* targets, const double* lse, const double* coef,
                            S* dlogits, int64_t T, int64_t V) {
  for (int64_t t = 0; t < T; ++t) {
    if (targets[t] < 0 || coef[t] == 0) continue;
    const S* l = logits + t * V;
    S* d = dlogits + t * V;
    for (int64_t i = 0; i < V; ++i) d[i] += S(coef[t] * std::exp(double(l[i]) - lse[t]));
    d[targets[t]] -= S(coef[t]);
  }
}

// L2Wrap (official `L2Wrap.backward`): at every position, the largest logit gets an extra gradient
// max · scale, with scale = 1e-4 / (B·T); nothing else changes. It is the gradient of the penalty
// scale · Σ_t ½ max_v(logits[t])², which l2wrap_penalty returns (the official code never logs it).
// Ties: the first maximal index (torch.max on CUDA gives no guarantee; ties have measure zero).
template <class S>
void l2wrap_backward(const S* logits, int64_t T, int64_t V, double scale, S* dlogits) {
  for (int64_t t = 0; t < T; ++t) {
    const S* l = logits + t * V;
    const int64_t am = std::max_element(l, l + V) - l;
    dlogits[t * V + am] += S(double(l[am]) * scale);
  }
}
template <class S>
double l2wrap_penalty(const S* logits, int64_t T, int64_t V, double scale) {
  double p = 0;
  for (int64_t t = 0; t < T; ++t) {
    const double m = *std::max_element(logits + t * V, logits + (t + 1) * V);
    p += 0.5 * m * m;
  }
  return p * scale;
}

// LongCE constants (official defaults: truncated context 4000, scored window 4000, cap 10).
struct LongCeParams {
  int64_t truncated = 4000;  // T_tr: context tokens the short forward sees before the scored window
  int64_t window = 4000;     // I: scored positions per short forward (also the stride)
  double cap = 10.0;
};

// One short forward: tokens [begin, end) of the sequence run as a fresh sequence; its local positions
// [truncated, truncated + n) are scored, i.e. global positions [begin + truncated, begin + truncated + n).
struct LongCeWindow {
  int64_t begin, end, n;
};

// for s in range(T_tr, L - T_tr, I): e = min(s + T_tr + I, L); n = e - (s + T_tr); skip n ≤ 0.
inline std::vector<LongCeWindow> longce_windows(int64_t L, const LongCeParams& p) {
  std::vector<LongCeWindow> w;
  for (int64_t s = p.truncated; s < L - p.truncated; s += p.window) {
    const int64_t e = std::min(s + p.truncated + p.window, L), n = e - (s + p.truncated);
    if (n > 0) w.push_back({s, e, n});
  }
  return w;
}

// Weight of one scored position: min(exp(ℓ_short - ℓ_full), cap) = min(p_long / p_short, cap), in double.
inline double longce_weight(double loss_short, double loss_full, double cap) {
  return std::min(std::exp(loss_short - loss_full), cap);
}

}  // namespace rwkvx::train
