// The fast CPU backend: SIMD kernels chosen at run time (kernels.h), a thread pool, weights kept in
// their stored precision (bf16/f16/f32, memory-mapped from the checkpoint) or quantized to int8 per
// output channel. Ops it does not specialise fall back to the reference loops (cheap O(T·C) ones).
#pragma once
#include <memory>

#include "backend/cpu/kernels.h"
#include "backend/reference/reference_backend.h"
#include "core/thread_pool.h"

namespace rwkvx {

struct CpuBackendOptions {
  int n_threads = 0;          // 0: one per hardware thread
  bool quantize_int8 = false; // Linear weights (not embedding, not low-rank) to int8, one scale per row
  std::string isa;            // "" = best available; else scalar | avx2 | avx512 | amx
};

std::unique_ptr<Backend> make_cpu_backend(const CpuBackendOptions& options = {});

namespace cpu {

class CpuBackend final : public ref::ReferenceBackend {
 public:
  explicit CpuBackend(const CpuBackendOptions& o);
  std::string name() const override;
  // 8192-row windows: the sparse attention groups a window's queries by the chunks they chose, so larger
  // windows read each chosen chunk for more queries at once (RWKV-X 0.2B, 64K prefill on 2 AMX cores:
  // 907 → 1010 tokens/s against 512 rows, medians), for ≈ 0.9 GB more activations. RWKVX_CPU_ROWS_PER_CALL
  // overrides it.
  int64_t preferred_rows_per_call() const override { return rows_per_call_; }
  const Kernels& kernels() const { return *k_; }
  ThreadPool& pool() { return pool_; }

  Tensor upload_weight(const StoredTensor& src, std::initializer_list<int64_t> shape) override;
  void embedding(const Tensor& E, const int32_t* ids, int64_t n, Tensor& out) override;
  void layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& out) override;
  void linear(const Tensor& x, const Tensor& W, Tensor& out) override { linear_into(x, W, out, false); }
  void linear_add(const Tensor& x, const Tensor& W, Tensor& out) override { linear_into(x, W, out, true); }
  void matmul(const Tensor& x, const Tensor& W, Tensor& out) override;
  void tanh_(Tensor& x) override;
  void sigmoid_(Tensor& x) override;
  void relu_square_(Tensor& x) override;
  void add_(Tensor& x, const Tensor& y) override;
  void shift_mix(const Tensor& x, const Tensor& delta, const Tensor& mu, Tensor& out) override;
  void rwkv7_wkv_inputs(Tensor& w, Tensor& a, Tensor& k, Tensor& alpha, Tensor& beta, const Tensor& w0,
                        const Tensor& a0, const Tensor& k_k, const Tensor& k_a, int head_size) override;
  void rwkv7_value_residual(Tensor& v, const Tensor& v_first, const Tensor& v_gate, const Tensor& v0) override;
  void wkv7(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& alpha,
            const Tensor& beta, Tensor& state, const SeqBatch& batch, Tensor& y, int head_size) override;
  void rwkv7_output(Tensor& y, const Tensor& r, const Tensor& k, const Tensor& v, const Tensor& r_k,
                    const Tensor& g, const Tensor& ln_w, const Tensor& ln_b, float eps, int head_size) override;
  void sparse_attention(const Tensor& q, const KvCache& cache, const SparseAttnParams& p, Tensor& out) override;

 private:
  // Splits rows [0, T) over the pool when the op is big enough to pay for the hand-off.
  void for_rows(int64_t T, int64_t work_per_row, const std::function<void(int64_t, int64_t)>& fn);
  // out = x @ Wᵀ, or out += x @ Wᵀ when accumulate.
  void linear_into(const Tensor& x, const Tensor& W, Tensor& out, bool accumulate);
  // x [T, K] into a_tiles_ for the AMX tile GEMMs (rows split over the pool).
  void pack_tiles(const Tensor& x, int64_t T, int64_t K);
  CpuBackendOptions opt_;
  int64_t rows_per_call_;
  const Kernels* k_;
  ThreadPool pool_;
  std::vector<float> a_panels_;  // linear's packed activations (ops run one at a time)
  std::vector<uint16_t> a_tiles_;  // the same for the AMX tile GEMM
};

WeightView weight_view(const Tensor& t);

}  // namespace cpu
}  // namespace rwkvx
