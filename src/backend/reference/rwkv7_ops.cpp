// Reference loops for the RWKV-7 time-mix ops of the contract (spec model.md §3, steps 3–9).
#include <cmath>

#include "backend/reference/reference_backend.h"

namespace rwkvx::ref {

void ReferenceBackend::rwkv7_wkv_inputs(Tensor& w, Tensor& a, Tensor& k, Tensor& alpha, Tensor& beta,
                                        const Tensor& w0, const Tensor& a0, const Tensor& k_k, const Tensor& k_a,
                                        int head_size) {
  const int64_t C = w0.numel(), T = k.numel() / C, H = C / head_size;
  const double neg_inv_sqrt_e = -std::exp(-0.5);
  for (int64_t t = 0; t < T; ++t) {
    float* wt = w.f32() + t * C;
    float* at = a.f32() + t * C;
    float* kt = k.f32() + t * C;
    float* al = alpha.f32() + t * C;
    float* be = beta.f32() + t * C;
    for (int64_t c = 0; c < C; ++c) {
      wt[c] = float(std::exp(neg_inv_sqrt_e / (1.0 + std::exp(-double(w0.f32()[c] + wt[c])))));
      at[c] = sigmoid(a0.f32()[c] + at[c]);
    }
    for (int64_t h = 0; h < H; ++h) {
      double norm = 0;
      for (int64_t j = h * head_size; j < (h + 1) * head_size; ++j) {
        const double kk = double(kt[j]) * k_k.f32()[j];
        norm += kk * kk;
      }
      const double inv = 1.0 / std::max(std::sqrt(norm), 1e-12);
      for (int64_t j = h * head_size; j < (h + 1) * head_size; ++j) {
        const float kk = float(double(kt[j]) * k_k.f32()[j] * inv);
        al[j] = -kk;
        be[j] = kk * at[j];
      }
    }
    for (int64_t c = 0; c < C; ++c) kt[c] = kt[c] * (1.0f + (at[c] - 1.0f) * k_a.f32()[c]);
  }
}

void ReferenceBackend::rwkv7_value_residual(Tensor& v, const Tensor& v_first, const Tensor& v_gate,
                                            const Tensor& v0) {
  const int64_t C = v0.numel();
  for (int64_t i = 0; i < v.numel(); ++i) {
    const float g = sigmoid(v0.f32()[i % C] + v_gate.f32()[i]);
    v.f32()[i] += (v_first.f32()[i] - v.f32()[i]) * g;
  }
}

void ReferenceBackend::wkv7(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
                            const Tensor& alpha, const Tensor& beta, Tensor& state, const SeqBatch& batch,
                            Tensor& y, int head_size) {
  const int64_t C = r.row_size(), N = head_size, H = C / N;
  RWKVX_ASSERT(state.numel() % (H * N * N) == 0, "wkv7: state shape " + state.shape_str());
  std::vector<double> sa(static_cast<size_t>(N));
  for (int64_t s = 0; s < batch.n_seq(); ++s) {
    float* S0 = state.f32() + int64_t(batch.slot[size_t(s)]) * H * N * N;
    for (int64_t t = batch.row_start[size_t(s)]; t < batch.row_start[size_t(s) + 1]; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        float* S = S0 + h * N * N;
        const int64_t o = t * C + h * N;
        for (int64_t i = 0; i < N; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < N; ++j) acc += double(S[i * N + j]) * alpha.f32()[o + j];
          sa[size_t(i)] = acc;
        }
        for (int64_t i = 0; i < N; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < N; ++j) {
            float& sij = S[i * N + j];
            sij = float(double(sij) * w.f32()[o + j] + sa[size_t(i)] * beta.f32()[o + j] +
                        double(v.f32()[o + i]) * k.f32()[o + j]);
            acc += double(sij) * r.f32()[o + j];
          }
          y.f32()[o + i] = float(acc);
        }
      }
    }
  }
}

void ReferenceBackend::rwkv7_output(Tensor& y, const Tensor& r, const Tensor& k, const Tensor& v,
                                    const Tensor& r_k, const Tensor& g, const Tensor& ln_w, const Tensor& ln_b,
                                    float eps, int head_size) {
  const int64_t C = ln_w.numel(), T = y.numel() / C, N = head_size, H = C / N;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t o = t * C + h * N;
      float* yh = y.f32() + o;
      double mean = 0, var = 0, u = 0;
      for (int64_t i = 0; i < N; ++i) mean += yh[i];
      mean /= double(N);
      for (int64_t i = 0; i < N; ++i) var += (yh[i] - mean) * (yh[i] - mean);
      var /= double(N);
      const double inv = 1.0 / std::sqrt(var + eps);
      for (int64_t j = 0; j < N; ++j) u += double(r.f32()[o + j]) * k.f32()[o + j] * r_k.f32()[h * N + j];
      for (int64_t i = 0; i < N; ++i) {
        const int64_t c = h * N + i;
        const double normed = (yh[i] - mean) * inv * ln_w.f32()[c] + ln_b.f32()[c];
        yh[i] = float((normed + u * v.f32()[o + i]) * g.f32()[o + i]);
      }
    }
  }
}

}  // namespace rwkvx::ref
