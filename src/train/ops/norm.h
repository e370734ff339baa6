// Training ops: LayerNorm and GroupNorm (spec model.md §2: LayerNorm eps 1e-5, biased variance; §3 step 8:
// ln_x is a GroupNorm over heads, eps 64e-5), forward and backward side by side. One function covers
// both: the C channels of a row are normalised in groups of G consecutive channels (G = C: LayerNorm;
// G = head size: GroupNorm over heads), then scaled and shifted per channel. Statistics in double.
// Backward ADDs into dx, dw, db (null = skip).
#pragma once
#include <cmath>
#include <cstdint>

namespace rwkvx::train {

// y = (x - mean_g) / sqrt(var_g + eps) * w + b. mean, rstd: [T · C/G] saved for the backward.
// x may alias y.
template <class S>
void group_norm_forward(const S* x, const S* w, const S* b, S* y, S* mean, S* rstd, int64_t T, int64_t C,
                        int64_t G, double eps) {
  const int64_t n_groups = C / G;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t g = 0; g < n_groups; ++g) {
      const int64_t o = t * C + g * G;
      double mu = 0, var = 0;
      for (int64_t i = 0; i < G; ++i) mu += double(x[o + i]);
      mu /= double(G);
      for (int64_t i = 0; i < G; ++i) var += (double(x[o + i]) - mu) * (double(x[o + i]) - mu);
      var /= double(G);
      const double inv = 1.0 / std::sqrt(var + eps);
      for (int64_t i = 0; i < G; ++i) {
        const int64_t c = g * G + i;
        y[o + i] = S((double(x[o + i]) - mu) * inv * double(w[c]) + double(b[c]));
      }
      mean[t * n_groups + g] = S(mu);
      rstd[t * n_groups + g] = S(inv);
    }
  }
}

// x̂ = (x - mean)·rstd;  dx̂ = dy ⊙ w;  dx += rstd (dx̂ - mean(dx̂) - x̂ mean(dx̂ ⊙ x̂));
// dw += Σ_t dy ⊙ x̂;  db += Σ_t dy.
template <class S>
void group_norm_backward(const S* dy, const S* x, const S* w, const S* mean, const S* rstd, S* dx, S* dw, S* db,
                         int64_t T, int64_t C, int64_t G) {
  const int64_t n_groups = C / G;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t g = 0; g < n_groups; ++g) {
      const int64_t o = t * C + g * G;
      const double mu = mean[t * n_groups + g], inv = rstd[t * n_groups + g];
      double m1 = 0, m2 = 0;
      for (int64_t i = 0; i < G; ++i) {
        const int64_t c = g * G + i;
        const double xh = (double(x[o + i]) - mu) * inv, dxh = double(dy[o + i]) * double(w[c]);
        m1 += dxh;
        m2 += dxh * xh;
        if (dw) dw[c] += S(double(dy[o + i]) * xh);
        if (db) db[c] += dy[o + i];
      }
      m1 /= double(G);
      m2 /= double(G);
      if (!dx) continue;
      for (int64_t i = 0; i < G; ++i) {
        const int64_t c = g * G + i;
        const double xh = (double(x[o + i]) - mu) * inv, dxh = double(dy[o + i]) * double(w[c]);
        dx[o + i] += S(inv * (dxh - m1 - xh * m2));
      }
    }
  }
}

}  // namespace rwkvx::train
