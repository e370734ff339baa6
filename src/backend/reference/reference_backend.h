// The fp32 reference backend: plain, obviously-correct loops (double accumulation where a sum is long).
// It is the ruler other backends are tested against; never optimise it. Ops are split by family:
// reference_backend.cpp (memory, dense, token shift), rwkv7_ops.cpp, sparse_attention.cpp.
#pragma once
#include <cmath>

#include "backend/ops.h"

namespace rwkvx::ref {

class ReferenceBackend : public Backend {
 public:
  std::string name() const override { return "reference-fp32"; }
  Tensor alloc(DType dtype, std::initializer_list<int64_t> shape) override;
  Tensor alloc_uninit(DType dtype, std::initializer_list<int64_t> shape) override;
  Tensor upload_weight(const StoredTensor& src, std::initializer_list<int64_t> shape) override;
  void to_host(const Tensor& src, float* dst) override;
  void from_host(const float* src, Tensor& dst) override;
  void copy(const Tensor& src, Tensor& dst) override;
  void fill_zero(Tensor& t) override;

  void embedding(const Tensor& E, const int32_t* ids, int64_t n, Tensor& out) override;
  void layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& out) override;
  void linear(const Tensor& x, const Tensor& W, Tensor& out) override;
  void matmul(const Tensor& x, const Tensor& W, Tensor& out) override;
  void tanh_(Tensor& x) override;
  void sigmoid_(Tensor& x) override;
  void relu_square_(Tensor& x) override;
  void add_(Tensor& x, const Tensor& y) override;
  void token_shift(const Tensor& x, Tensor& shift, const SeqBatch& batch, Tensor& delta) override;
  void shift_mix(const Tensor& x, const Tensor& delta, const Tensor& mu, Tensor& out) override;

  void rwkv7_wkv_inputs(Tensor& w, Tensor& a, Tensor& k, Tensor& alpha, Tensor& beta, const Tensor& w0,
                        const Tensor& a0, const Tensor& k_k, const Tensor& k_a, int head_size) override;
  void rwkv7_value_residual(Tensor& v, const Tensor& v_first, const Tensor& v_gate, const Tensor& v0) override;
  void wkv7(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& alpha,
            const Tensor& beta, Tensor& state, const SeqBatch& batch, Tensor& y, int head_size) override;
  void rwkv7_output(Tensor& y, const Tensor& r, const Tensor& k, const Tensor& v, const Tensor& r_k,
                    const Tensor& g, const Tensor& ln_w, const Tensor& ln_b, float eps, int head_size) override;

  void kv_append(KvCache& cache, const Tensor& k, const Tensor& v, int chunk) override;
  void sparse_attention(const Tensor& q, const KvCache& cache, const SparseAttnParams& p, Tensor& out) override;
  void kv_evict(KvCache& cache, const Tensor& q, const KvEvictionParams& e, const SparseAttnParams& p) override;
};

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

}  // namespace rwkvx::ref
