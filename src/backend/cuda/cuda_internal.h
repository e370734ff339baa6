// CUDA backend internals, shared by its translation units:
//   cuda_backend.cu   memory (caching allocator), transfers, dense ops, cuBLASLt GEMMs, token shift
//   cuda_rwkv7.cu     the RWKV-7 time-mix ops and the WKV-7 recurrence kernel
//   cuda_sparse.cu    KV cache append with chunk means, top-k chunk sparse attention, eviction
//   cuda_decode.cu    the whole-step decoder: fused decode kernels for B streams, captured as a CUDA graph
// Every op runs on the backend's one stream, in order; to_host synchronises. Temporary device buffers come
// from the same caching allocator as tensors and go back to it when released: the stream's order makes a
// buffer freed by the host safe to hand out again for later work on that stream.
#pragma once
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "backend/cuda/cuda_backend.h"

namespace rwkvx::cuda {

[[noreturn]] void throw_cuda_error(const char* what, const char* file, int line, const std::string& detail);

#define RWKVX_CUDA_CHECK(expr)                                                                           \
  do {                                                                                                   \
    cudaError_t err_ = (expr);                                                                           \
    if (err_ != cudaSuccess) ::rwkvx::cuda::throw_cuda_error(#expr, __FILE__, __LINE__, cudaGetErrorString(err_)); \
  } while (0)
#define RWKVX_CUBLAS_CHECK(expr)                                                                         \
  do {                                                                                                   \
    cublasStatus_t st_ = (expr);                                                                         \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                                    \
      ::rwkvx::cuda::throw_cuda_error(#expr, __FILE__, __LINE__, "cublas status " + std::to_string(int(st_))); \
  } while (0)
// After every kernel launch: launch-configuration errors surface here, not at the next sync.
#define RWKVX_CUDA_LAUNCHED() RWKVX_CUDA_CHECK(cudaGetLastError())

// Size-bucketed cache of device allocations (cudaFree synchronises the device; a decode step allocates
// hundreds of small temporaries). Blocks are reused only by work on the owning backend's stream.
class DevicePool {
 public:
  explicit DevicePool(int device) : device_(device) {}
  ~DevicePool();
  void* get(size_t bytes, size_t* rounded);
  void put(void* p, size_t rounded);
  void release_cached();  // frees every cached block (after a failed cudaMalloc, at shutdown)
  static constexpr size_t kReleaseBytes = size_t(256) << 20;  // blocks this large are not cached

 private:
  int device_;
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
};

// Device copy of a SeqBatch: row_start (n_seq + 1 int64) then slot (n_seq int32), re-uploaded only when it
// changes (a decode loop passes the same batch to every block).
struct DeviceBatch {
  const int64_t* row_start = nullptr;
  const int32_t* slot = nullptr;
  int n_seq = 0;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaBackendOptions& options);
  ~CudaBackend() override;
  std::string name() const override { return name_; }
  // 16384-row windows by default: GEMMs large enough to fill the tensor cores and fewer per-call passes over
  // the KV cache (RWKV-X 0.2B prefill on an H100: 148K → 182K tokens/s at 128K, 78K → 136K at 1M against
  // 4096 rows; 32768 is slower again); activations ~0.5 GB. RWKVX_CUDA_ROWS_PER_CALL overrides it.
  int64_t preferred_rows_per_call() const override { return rows_per_call_; }

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
  void linear_add(const Tensor& x, const Tensor& W, Tensor& out) override;
  // HBM bandwidth from a device-to-device copy (read + write) and the bf16 tensor-core rate from a cuBLASLt
  // GEMM of 8192³ with fp32 accumulation, best of several runs each.
  DeviceFloors measure_floors() override;
  // bf16x2 for prefill rows against bf16 weights whose doubled copies are allowed (the split GEMM's operand).
  DType gemm_input_dtype(std::span<const Tensor* const> weights, int64_t rows) const override;
  void relu_square_ffn(const Tensor& x, const Tensor& key, const Tensor& value, Tensor& out) override;
  void matmul(const Tensor& x, const Tensor& W, Tensor& out) override;
  void tanh_(Tensor& x) override;
  void sigmoid_(Tensor& x) override;
  void relu_square_(Tensor& x) override;
  void add_(Tensor& x, const Tensor& y) override;
  void token_shift(const Tensor& x, Tensor& shift, const SeqBatch& batch, Tensor& delta) override;
  void shift_mix(const Tensor& x, const Tensor& delta, const Tensor& mu, Tensor& out) override;
  void token_shift_mix_n(const Tensor& x, Tensor& shift, const SeqBatch& batch, std::span<const Tensor* const> mus,
                         std::span<Tensor* const> outs) override;

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
  // cuda_decode.cu: fused kernels for a whole decode step, replayed as a CUDA graph (nullptr when the model's
  // shapes are outside what they support, or RWKVX_CUDA_STEP_DECODER=0).
  std::unique_ptr<StepDecoder> make_step_decoder(const ModelConfig& cfg, const ModelWeights& w) override;

  // ---- helpers for the backend's own translation units ----
  cudaStream_t stream() const { return stream_; }
  // Uninitialised device scratch of `bytes`, returned to the pool when the Tensor is dropped.
  Tensor scratch(size_t bytes);
  DeviceBatch upload_batch(const SeqBatch& batch);
  // With RWKVX_CUDA_PROFILE=1 each op records a CUDA event before and after its kernels (nothing waits) and
  // its GPU time goes into a per-op table printed to stderr when the backend is destroyed (a profile that
  // needs no tools; an op inside another counts in both). RWKVX_CUDA_PROFILE=sync instead synchronises
  // around every op and counts wall time (host overhead included).
  struct OpTimer {
    OpTimer(CudaBackend* be, const char* op);
    ~OpTimer();
    CudaBackend* be;
    const char* op;
    double t0 = 0;
    cudaEvent_t start = nullptr;
  };
  void count_op(const char* op, double seconds);
  void synchronize();
  // Room for `rows` rows of C values in a cache's k, v and chunk means (rounded up to whole chunks), its
  // contents kept and the new rows left uninitialised (no kernel reads past len).
  void grow_kv_cache(KvCache& cache, int64_t rows, int64_t C, int chunk);
  // Memory only prefill uses between calls (the attention's bf16 copy of the KV rows), given back when decode
  // starts.
  void drop_prefill_scratch() { kv_split_ = Tensor{}; }
  int sm_count() const { return sm_count_; }
  // Device copy of `host` (int64 words), uploaded only when it differs from `cached_host` (the last upload
  // into `dev`): an upload from pageable memory waits for the stream, so repeated tables must not re-upload.
  const int64_t* upload_cached(const std::vector<int64_t>& host, std::vector<int64_t>& cached_host, Tensor& dev);

 private:
  struct GemmPlan;
  // D[m, n] (column-major, ld m) = op(A) · B (+ D when accumulate), A [k, m] if trans_a else [m, k], B [k, n];
  // fp32 accumulate.
  void gemm(bool trans_a, const void* A, cudaDataType ta, const void* B, cudaDataType tb, float* D, int64_t m,
            int64_t n, int64_t k, bool accumulate = false);
  // out [T, N] = x [T, K] · Wᵀ (trans_w: W [N, K]) or x · W (W [K, N]), for fp32 or bf16 W.
  // accumulate: out += instead (GEMMs only: up to kGemvMaxRows rows, linear_add takes the default path).
  void weight_gemm(bool trans_w, const Tensor& x, const Tensor& W, Tensor& out, int64_t T, int64_t K, int64_t N,
                   bool accumulate = false);
  // The split (hi + lo) product of a bf16 weight as one GEMM over 2K: W laid out twice along K ([W | W] per
  // row for trans_w, [W; W] otherwise), made on first use and kept while W's storage lives, within a budget
  // of device memory (nullptr past it: two GEMMs instead). Writes into a bf16 tensor drop its copy.
  const void* doubled_weight(bool trans_w, const Tensor& W, int64_t K, int64_t N);
  void split_gemm(bool trans_w, const Tensor& x, const void* W2, Tensor& out, int64_t T, int64_t K, int64_t N,
                  bool accumulate, bool relu_square);
  void forget_doubled(const Tensor& dst);
  struct DoubledWeight {
    std::weak_ptr<const void> owner;  // W.storage: a new tensor at the same address is a different owner
    Tensor copy;
  };
  std::map<std::pair<const void*, bool>, DoubledWeight> doubled_;
  size_t doubled_bytes_ = 0, doubled_budget_ = 0;

  CudaBackendOptions opt_;
  int device_ = 0;
  int sm_count_ = 0;
  std::string name_;
  cudaStream_t stream_ = nullptr;
  std::shared_ptr<DevicePool> pool_;
  cublasLtHandle_t lt_ = nullptr;
  Tensor workspace_;
  std::map<std::tuple<int, int, int, int64_t, int64_t, int64_t, int>, std::shared_ptr<GemmPlan>> plans_;
  bool profile_ = false, profile_sync_ = false;
  std::map<std::string, std::pair<int64_t, double>> profile_table_;
  struct ProfileMark {
    const char* op;
    cudaEvent_t start, end;
  };
  std::vector<ProfileMark> profile_marks_;  // recorded, not yet read
  std::vector<cudaEvent_t> profile_events_;  // free for reuse
  cudaEvent_t profile_event();
  void profile_resolve();  // waits for the recorded marks and adds their times to the table
  // upload_batch cache
  std::vector<int64_t> batch_host_;
  Tensor batch_dev_;
  // Prefill attention's bf16 (hi, lo) copy of an fp32 KV cache's rows: kept from call to call, made for
  // `hint` bytes (the cache's capacity) or grown by half again when too small, dropped when decode starts.
  // (Fresh each call, a block of hundreds of MB went back to the driver with a device-wide synchronisation
  // every time.)
  void* kv_split_buffer(size_t bytes, size_t hint);
  Tensor kv_split_;
  // wkv7's segment table, re-uploaded only when it changes (every layer of a prefill window reuses it)
  std::vector<int64_t> wkv_segments_host_;
  Tensor wkv_segments_dev_;
  // to_host: pinned staging buffer (copies up to kStageMax bytes go through it, in pieces, each piece copied on
  // to the caller's memory as soon as it has arrived) and one event per piece.
  static constexpr size_t kStageMax = size_t(64) << 20;
  static constexpr int kStagePieces = 4;
  bool pinned_to_host_ = true;
  int64_t rows_per_call_ = 16384;
  void* stage_ = nullptr;
  size_t stage_cap_ = 0;
  cudaEvent_t stage_ev_[kStagePieces] = {};
};

// Kernel-side helpers shared by the .cu files.
template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

__host__ __device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum over the block; blockDim.x must be a multiple of 32 (≤ 1024). Every thread gets the result.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // protects `part` from a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  T s = lane < n_warps ? part[lane] : T(0);
  return warp_sum(s);
}

inline unsigned grid_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : (b > (1 << 30) ? (1 << 30) : b));
}
inline int round_up_warp(int64_t n) { return int((n + 31) / 32 * 32); }
// 16-byte vector loads and stores need 16-byte aligned addresses.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
// Grid of row-wise element kernels that give each thread 4 consecutive columns of a row: x = column blocks
// of `threads` threads, y = rows (at most 65535; the kernels loop over the rest).
inline dim3 row_quads_grid(int64_t rows, int64_t cols, int threads) {
  return dim3(unsigned((cols + 4 * threads - 1) / (4 * threads)), unsigned(rows < 65535 ? rows : 65535));
}

}  // namespace rwkvx::cuda
