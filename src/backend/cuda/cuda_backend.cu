// CUDA backend: device memory (a caching allocator), transfers, the dense ops, cuBLASLt GEMMs and the token
// shift. bf16 checkpoint matrices stay bf16 on the device; fp32 ones stay fp32 (a true fp32 GEMM, no TF32).
// With bf16 weights, prefill GEMMs (> 8 rows) take the activations as two bf16 parts hi + lo in one
// cuBLASLt GEMM of twice the columns (fp32 accumulate, fp32 output), or one rounding when asked; decode
// GEMMs (≤ 8 rows) run GEMV kernels on the fp32 activations. Vectors (mixes, norms, r_k) are fp32.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "backend/cuda/cuda_internal.h"
#include "core/parse.h"

namespace rwkvx {

bool cuda_device_available(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    if (why) *why = e != cudaSuccess ? std::string(cudaGetErrorString(e)) : std::string("no CUDA device found");
    cudaGetLastError();  // clear the sticky-free error state of the query
    return false;
  }
  return true;
}

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options) {
  std::string why;
  if (!cuda_device_available(&why)) throw Error("CUDA backend: " + why);
  return std::make_unique<cuda::CudaBackend>(options);
}

namespace cuda {

void throw_cuda_error(const char* what, const char* file, int line, const std::string& detail) {
  throw Error(std::string("CUDA error: ") + detail + " (" + what + " at " + file + ":" + std::to_string(line) + ")");
}

// ---- caching allocator ------------------------------------------------------------------------------------

namespace {

size_t round_bytes(size_t n) {
  n = std::max<size_t>(n, 256);
  if (n <= (size_t(1) << 20)) {  // small: powers of two
    size_t p = 256;
    while (p < n) p <<= 1;
    return p;
  }
  const size_t g = size_t(2) << 20;  // large: 2 MiB granules
  return (n + g - 1) / g * g;
}

}  // namespace

DevicePool::~DevicePool() { release_cached(); }

void* DevicePool::get(size_t bytes, size_t* rounded) {
  const size_t r = round_bytes(bytes);
  *rounded = r;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = free_.lower_bound(r);
    // Reuse a cached block of this size, or a large one at most 25% bigger.
    if (it != free_.end() && (it->first == r || (r > (size_t(1) << 20) && it->first <= r + r / 4))) {
      void* p = it->second;
      *rounded = it->first;
      free_.erase(it);
      return p;
    }
  }
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, r);
  if (e != cudaSuccess) {
    cudaGetLastError();
    cudaDeviceSynchronize();
    release_cached();
    e = cudaMalloc(&p, r);
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw Error("CUDA: out of device memory allocating " + std::to_string(r >> 20) + " MiB");
  }
  return p;
}

void DevicePool::put(void* p, size_t rounded) {
  if (rounded >= kReleaseBytes) {
    // Large blocks (KV caches outgrown by a doubling) go back to the driver, so the device memory in use is
    // what is live, not what was ever live. Waits for queued work that may still read the block.
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(device_);
    cudaDeviceSynchronize();
    cudaFree(p);
    cudaSetDevice(prev);
    return;
  }
  std::lock_guard<std::mutex> lk(mu_);
  free_.emplace(rounded, p);
}

void DevicePool::release_cached() {
  std::lock_guard<std::mutex> lk(mu_);
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(device_);
  for (auto& [n, p] : free_) cudaFree(p);
  free_.clear();
  cudaSetDevice(prev);
}

// ---- backend ----------------------------------------------------------------------------------------------

struct CudaBackend::GemmPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool fallback = false;  // no cuBLASLt algorithm: gemm_fallback_kernel
  ~GemmPlan() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

CudaBackend::CudaBackend(const CudaBackendOptions& o) : opt_(o), device_(o.device) {
  const int device = o.device;
  RWKVX_CUDA_CHECK(cudaSetDevice(device));
  cudaDeviceProp prop{};
  RWKVX_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  sm_count_ = prop.multiProcessorCount;
  name_ = std::string("cuda:") + std::to_string(device) + " " + prop.name +
          (o.single_bf16_activations ? " bf16-activations" : o.single_bf16_attention ? " bf16-attention" : "");
  RWKVX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  pool_ = std::make_shared<DevicePool>(device);
  RWKVX_CUBLAS_CHECK(cublasLtCreate(&lt_));
  const char* prof = std::getenv("RWKVX_CUDA_PROFILE");
  profile_ = prof && (std::string(prof) == "1" || std::string(prof) == "sync");
  profile_sync_ = prof && std::string(prof) == "sync";
  if (const char* seg = std::getenv("RWKVX_CUDA_WKV_SEGMENT"); seg && *seg && opt_.wkv_segment_rows < 0) {
    char* end = nullptr;
    const long rows = std::strtol(seg, &end, 10);
    if (*end != '\0' || rows < 0 || rows > (1L << 30))
      throw Error(std::string("RWKVX_CUDA_WKV_SEGMENT='") + seg + "': expected a row count (0 = sequential WKV-7)");
    opt_.wkv_segment_rows = int(rows);
  }
  if (const char* pin = std::getenv("RWKVX_CUDA_PINNED_COPY"); pin && std::string(pin) == "0") pinned_to_host_ = false;
  rows_per_call_ = env_row_count("RWKVX_CUDA_ROWS_PER_CALL", rows_per_call_);
  workspace_ = scratch(size_t(32) << 20);
  if (const char* c = std::getenv("RWKVX_CUDA_WEIGHT_COPIES"); c && std::string(c) == "0")
    opt_.split_gemm_weight_copies = false;
  doubled_budget_ = opt_.split_gemm_weight_copies ? prop.totalGlobalMem / 8 : 0;
}

namespace {
double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

bool capturing(cudaStream_t s) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(s, &st) == cudaSuccess && st != cudaStreamCaptureStatusNone;
}
}  // namespace

CudaBackend::OpTimer::OpTimer(CudaBackend* b, const char* o) : be(b), op(o) {
  if (!be->profile_ || capturing(be->stream_)) return;
  if (be->profile_sync_) {
    be->synchronize();
    t0 = now_s();
    return;
  }
  start = be->profile_event();
  RWKVX_CUDA_CHECK(cudaEventRecord(start, be->stream_));
}
CudaBackend::OpTimer::~OpTimer() {
  if (!be->profile_) return;
  if (be->profile_sync_) {
    if (t0 > 0 && cudaStreamSynchronize(be->stream_) == cudaSuccess) be->count_op(op, now_s() - t0);
    return;
  }
  if (!start) return;
  cudaEvent_t end = be->profile_event();
  if (cudaEventRecord(end, be->stream_) != cudaSuccess) return;
  be->profile_marks_.push_back({op, start, end});
  if (be->profile_marks_.size() >= 4096) be->profile_resolve();
}
cudaEvent_t CudaBackend::profile_event() {
  if (!profile_events_.empty()) {
    cudaEvent_t e = profile_events_.back();
    profile_events_.pop_back();
    return e;
  }
  cudaEvent_t e = nullptr;
  RWKVX_CUDA_CHECK(cudaEventCreate(&e));
  return e;
}
void CudaBackend::profile_resolve() {
  if (profile_marks_.empty()) return;
  cudaEventSynchronize(profile_marks_.back().end);
  for (const ProfileMark& m : profile_marks_) {
    float ms = 0;
    if (cudaEventElapsedTime(&ms, m.start, m.end) == cudaSuccess) count_op(m.op, ms * 1e-3);
    profile_events_.push_back(m.start);
    profile_events_.push_back(m.end);
  }
  profile_marks_.clear();
}
void CudaBackend::count_op(const char* op, double seconds) {
  auto& e = profile_table_[op];
  e.first += 1, e.second += seconds;
}

CudaBackend::~CudaBackend() {
  cudaStreamSynchronize(stream_);
  profile_resolve();
  for (cudaEvent_t e : profile_events_) cudaEventDestroy(e);
  if (profile_ && !profile_table_.empty()) {
    double total = 0;
    for (auto& [k, v] : profile_table_) total += v.second;
    std::fprintf(stderr, "rwkvx CUDA profile (%s): op, calls, total ms, share\n", name_.c_str());
    std::vector<std::pair<double, std::string>> rows;
    for (auto& [k, v] : profile_table_) rows.push_back({v.second, k});
    std::sort(rows.rbegin(), rows.rend());
    for (auto& [t, k] : rows)
      std::fprintf(stderr, "  %-22s %10lld %12.3f %6.1f%%\n", k.c_str(), (long long)profile_table_[k].first, t * 1e3,
                   100 * t / total);
  }
  plans_.clear();
  workspace_ = Tensor{};
  kv_split_ = Tensor{};
  batch_dev_ = Tensor{};
  for (cudaEvent_t& e : stage_ev_)
    if (e) cudaEventDestroy(e);
  if (stage_) cudaFreeHost(stage_);
  if (lt_) cublasLtDestroy(lt_);
  cudaStreamDestroy(stream_);
}

void CudaBackend::synchronize() { RWKVX_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

Tensor CudaBackend::scratch(size_t bytes) {
  Tensor t;
  t.dtype = DType::f32;
  t.device = Device::cuda;
  t.ndim = 1;
  t.shape = {int64_t((bytes + 3) / 4), 0, 0, 0};
  size_t rounded = 0;
  void* p = pool_->get(bytes, &rounded);
  std::shared_ptr<DevicePool> pool = pool_;
  t.storage = std::shared_ptr<void>(p, [pool, rounded](void* q) { pool->put(q, rounded); });
  t.data = p;
  return t;
}

Tensor CudaBackend::alloc_uninit(DType dtype, std::initializer_list<int64_t> shape) {
  OpTimer timer_(this, "alloc");
  RWKVX_ASSERT(shape.size() <= 4, "too many dimensions");
  RWKVX_ASSERT(dtype == DType::f32 || dtype == DType::bf16 || dtype == DType::bf16x2,
               std::string("CUDA alloc: unsupported dtype ") + std::string(dtype_name(dtype)));
  Tensor t;
  t.device = Device::cuda;
  t.dtype = dtype;
  t.ndim = int(shape.size());
  int i = 0;
  for (int64_t d : shape) t.shape[i++] = d;
  size_t rounded = 0;
  void* p = pool_->get(std::max<size_t>(t.nbytes(), 1), &rounded);
  std::shared_ptr<DevicePool> pool = pool_;
  t.storage = std::shared_ptr<void>(p, [pool, rounded](void* q) { pool->put(q, rounded); });
  t.data = p;
  if (opt_.poison_uninit) RWKVX_CUDA_CHECK(cudaMemsetAsync(p, 0xff, t.nbytes(), stream_));  // NaN in every dtype
  return t;
}

Tensor CudaBackend::alloc(DType dtype, std::initializer_list<int64_t> shape) {
  Tensor t = alloc_uninit(dtype, shape);
  RWKVX_CUDA_CHECK(cudaMemsetAsync(t.data, 0, t.nbytes(), stream_));
  return t;
}

Tensor CudaBackend::upload_weight(const StoredTensor& src, std::initializer_list<int64_t> shape) {
  Tensor probe;
  probe.ndim = int(shape.size());
  int i = 0;
  for (int64_t d : shape) probe.shape[i++] = d;
  RWKVX_ASSERT(probe.numel() == src.numel(), "upload_weight: " + src.name + " reshaped to a different size");
  // Matrices keep bf16; everything else (vectors, r_k, f16 matrices) becomes fp32 (exact widening).
  const bool keep_bf16 = src.dtype == DType::bf16 && shape.size() == 2 && !src.name.ends_with("att.r_k");
  Tensor t = alloc(keep_bf16 ? DType::bf16 : DType::f32, shape);
  if (keep_bf16) {
    RWKVX_CUDA_CHECK(cudaMemcpyAsync(t.data, src.data, src.nbytes(), cudaMemcpyHostToDevice, stream_));
  } else {
    std::vector<float> host(static_cast<size_t>(src.numel()));
    convert_to_f32(src.dtype, src.data, host.data(), host.size());
    RWKVX_CUDA_CHECK(cudaMemcpyAsync(t.data, host.data(), host.size() * 4, cudaMemcpyHostToDevice, stream_));
    synchronize();  // `host` dies here
  }
  return t;
}

// A copy to pageable memory is staged by the driver and waits for the stream first; this one goes through a
// pinned buffer in up to kStagePieces pieces queued at once, the host copying each piece on as soon as its
// event has fired while the next pieces are still in flight (a decode step's 65 536 logits: 4 × 64 KB).
// RWKVX_CUDA_PINNED_COPY=0: the plain pageable copy.
void CudaBackend::to_host(const Tensor& src, float* dst) {
  RWKVX_ASSERT(src.dtype == DType::f32 && src.device == Device::cuda, "to_host: needs an fp32 CUDA tensor");
  const size_t n = src.nbytes();
  if (!pinned_to_host_ || n > kStageMax || n == 0) {
    RWKVX_CUDA_CHECK(cudaMemcpyAsync(dst, src.data, n, cudaMemcpyDeviceToHost, stream_));
    synchronize();
    return;
  }
  if (stage_cap_ < n) {
    if (stage_) RWKVX_CUDA_CHECK(cudaFreeHost(stage_));
    stage_ = nullptr, stage_cap_ = 0;
    const size_t cap = std::max<size_t>(n, size_t(1) << 20);
    RWKVX_CUDA_CHECK(cudaMallocHost(&stage_, cap));
    stage_cap_ = cap;
  }
  for (cudaEvent_t& e : stage_ev_)
    if (!e) RWKVX_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  // Pieces of at least 64 KB (small copies in one piece), 16-byte aligned.
  const size_t piece = std::max<size_t>((n + kStagePieces - 1) / kStagePieces + 15, size_t(64) << 10) / 16 * 16;
  const auto* s = static_cast<const uint8_t*>(src.data);
  auto* st = static_cast<uint8_t*>(stage_);
  int pieces = 0;
  for (size_t off = 0; off < n; off += piece, ++pieces) {
    const size_t len = std::min(piece, n - off);
    RWKVX_CUDA_CHECK(cudaMemcpyAsync(st + off, s + off, len, cudaMemcpyDeviceToHost, stream_));
    RWKVX_CUDA_CHECK(cudaEventRecord(stage_ev_[pieces], stream_));
  }
  auto* d = reinterpret_cast<uint8_t*>(dst);
  for (int p = 0; p < pieces; ++p) {
    const size_t off = size_t(p) * piece, len = std::min(piece, n - off);
    RWKVX_CUDA_CHECK(cudaEventSynchronize(stage_ev_[p]));
    std::memcpy(d + off, st + off, len);
  }
}

void CudaBackend::from_host(const float* src, Tensor& dst) {
  RWKVX_ASSERT(dst.dtype == DType::f32 && dst.device == Device::cuda, "from_host: needs an fp32 CUDA tensor");
  RWKVX_CUDA_CHECK(cudaMemcpyAsync(dst.data, src, dst.nbytes(), cudaMemcpyHostToDevice, stream_));
  synchronize();  // the caller may free `src` as soon as we return
}

void CudaBackend::copy(const Tensor& src, Tensor& dst) {
  RWKVX_ASSERT(src.dtype == dst.dtype && src.numel() == dst.numel(), "copy: mismatched tensors");
  if (src.nbytes() == 0 || src.data == dst.data) return;
  forget_doubled(dst);
  RWKVX_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, src.nbytes(), cudaMemcpyDeviceToDevice, stream_));
}

void CudaBackend::fill_zero(Tensor& t) {
  forget_doubled(t);
  if (t.nbytes()) RWKVX_CUDA_CHECK(cudaMemsetAsync(t.data, 0, t.nbytes(), stream_));
}

const int64_t* CudaBackend::upload_cached(const std::vector<int64_t>& host, std::vector<int64_t>& cached_host,
                                          Tensor& dev) {
  if (host != cached_host || dev.empty()) {
    if (dev.empty() || dev.nbytes() < host.size() * 8) dev = scratch(std::max<size_t>(host.size() * 8, 4096));
    RWKVX_CUDA_CHECK(cudaMemcpyAsync(dev.data, host.data(), host.size() * 8, cudaMemcpyHostToDevice, stream_));
    cached_host = host;
  }
  return static_cast<const int64_t*>(dev.data);
}

DeviceBatch CudaBackend::upload_batch(const SeqBatch& batch) {
  const int n = int(batch.n_seq());
  std::vector<int64_t> h(size_t(2 * n + 2));
  for (int s = 0; s <= n; ++s) h[size_t(s)] = batch.row_start[size_t(s)];
  auto* slots = reinterpret_cast<int32_t*>(h.data() + n + 1);
  for (int s = 0; s < n; ++s) slots[s] = batch.slot[size_t(s)];
  DeviceBatch d;
  d.row_start = upload_cached(h, batch_host_, batch_dev_);
  d.slot = reinterpret_cast<const int32_t*>(d.row_start + n + 1);
  d.n_seq = n;
  return d;
}

// ---- kernels: dense ops -----------------------------------------------------------------------------------

namespace {

template <typename T>
__global__ void embedding_kernel(const T* E, const int32_t* ids, int64_t n, int64_t C, float* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n * C; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = to_f32(E[int64_t(ids[i / C]) * C + i % C]);
}

// One block per row; two passes over the row (mean, then centred variance).
__global__ void layer_norm_kernel(const float* x, const float* w, const float* b, float eps, int64_t C, float* out) {
  const float* xi = x + blockIdx.x * C;
  float* o = out + blockIdx.x * C;
  float s = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += xi[c];
  const float mean = block_sum(s) / float(C);
  float v = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) v += (xi[c] - mean) * (xi[c] - mean);
  const float inv = rsqrtf(block_sum(v) / float(C) + eps);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) o[c] = (xi[c] - mean) * inv * w[c] + b[c];
}

// Rows of up to 32·kLnPerLane values: one warp per row, the row in registers (one read of x, shuffles only,
// no block barriers); out may be x.
constexpr int kLnPerLane = 32, kLnWarps = 8;
__global__ void layer_norm_warp_kernel(const float* x, const float* w, const float* b, float eps, int64_t T, int64_t C,
                                       float* out) {
  const int lane = threadIdx.x % 32;
  const int64_t t = int64_t(blockIdx.x) * kLnWarps + threadIdx.x / 32;
  if (t >= T) return;
  const float* xi = x + t * C;
  float* o = out + t * C;
  float v[kLnPerLane];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kLnPerLane; ++i) {
    const int64_t c = lane + 32 * i;
    v[i] = c < C ? xi[c] : 0.f;
    s += v[i];
  }
  const float mean = warp_sum(s) / float(C);
  float q = 0.f;
#pragma unroll
  for (int i = 0; i < kLnPerLane; ++i)
    if (lane + 32 * i < C) q += (v[i] - mean) * (v[i] - mean);
  const float inv = rsqrtf(warp_sum(q) / float(C) + eps);
#pragma unroll
  for (int i = 0; i < kLnPerLane; ++i) {
    const int64_t c = lane + 32 * i;
    if (c < C) o[c] = (v[i] - mean) * inv * w[c] + b[c];
  }
}

// x ≈ hi + lo with hi = bf16(x), lo = bf16(x - hi): y[0, n) = hi, y[n, 2n) = lo (when `split`).
__global__ void to_bf16_kernel(const float* x, int64_t n, bool split, __nv_bfloat16* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const __nv_bfloat16 hi = __float2bfloat16_rn(x[i]);
    y[i] = hi;
    if (split) y[n + i] = __float2bfloat16_rn(x[i] - __bfloat162float(hi));
  }
}

// Rows [hi | lo] of x [T, K] (of max(x, 0)² with kReluSquare): the operand of the single split GEMM over 2K
// against a doubled weight. Grid (column blocks, rows): each thread converts 4 consecutive values of a row
// (16-byte loads when K % 4 == 0 and x is aligned), with no index division; rows past gridDim.y loop.
__device__ __forceinline__ float relu_sq(float v) {
  v = fmaxf(v, 0.f);
  return v * v;
}
// One value / four consecutive values (16-byte aligned source, even column) of a bf16x2 row of K columns:
// hi = bf16(v) at column c, lo = bf16(v - hi) at K + c.
__device__ __forceinline__ void store_split(__nv_bfloat16* row, int64_t K, int64_t c, float v) {
  const __nv_bfloat16 hi = __float2bfloat16_rn(v);
  row[c] = hi;
  row[K + c] = __float2bfloat16_rn(v - __bfloat162float(hi));
}
__device__ __forceinline__ void store_split4(__nv_bfloat16* row, int64_t K, int64_t c, float4 v) {
  const __nv_bfloat162 h01 = __floats2bfloat162_rn(v.x, v.y), h23 = __floats2bfloat162_rn(v.z, v.w);
  const float2 f01 = __bfloat1622float2(h01), f23 = __bfloat1622float2(h23);
  *reinterpret_cast<__nv_bfloat162*>(row + c) = h01, *reinterpret_cast<__nv_bfloat162*>(row + c + 2) = h23;
  *reinterpret_cast<__nv_bfloat162*>(row + K + c) = __floats2bfloat162_rn(v.x - f01.x, v.y - f01.y);
  *reinterpret_cast<__nv_bfloat162*>(row + K + c + 2) = __floats2bfloat162_rn(v.z - f23.x, v.w - f23.y);
}

template <bool kReluSquare>
__global__ void to_bf16_split_rows_kernel(const float* x, int64_t T, int64_t K, bool vec4, __nv_bfloat16* y) {
  const int64_t j = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (j >= K) return;
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    const float* xr = x + t * K;
    __nv_bfloat16* hr = y + t * 2 * K;
    if (vec4 && j + 4 <= K) {
      float4 v = *reinterpret_cast<const float4*>(xr + j);
      if (kReluSquare) v = make_float4(relu_sq(v.x), relu_sq(v.y), relu_sq(v.z), relu_sq(v.w));
      store_split4(hr, K, j, v);
    } else {
      for (int64_t c = j; c < j + 4 && c < K; ++c) store_split(hr, K, c, kReluSquare ? relu_sq(xr[c]) : xr[c]);
    }
  }
}

// bf16x2 rows [hi | lo] of [T, K] → fp32 hi + lo (an exact sum: both are multiples of the last place of the
// fp32 value they were split from, and it is below 2^24 of those).
__global__ void from_bf16x2_kernel(const __nv_bfloat16* x, int64_t T, int64_t K, float* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < T * K; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / K, c = i % K;
    y[i] = __bfloat162float(x[t * 2 * K + c]) + __bfloat162float(x[t * 2 * K + K + c]);
  }
}

// Pseudo-random bf16 values in [-1, 1) (a GEMM on zeros draws less power and clocks higher than on data).
__global__ void fill_noise_bf16_kernel(__nv_bfloat16* x, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    x[i] = __float2bfloat16_rn(float(h >> 8) * (2.0f / 16777216.0f) - 1.0f);
  }
}

// W [N, K] → [N, 2K] with rows [W_n | W_n].
__global__ void double_rows_kernel(const __nv_bfloat16* w, int64_t N, int64_t K, __nv_bfloat16* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N * K; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / K, j = i % K;
    out[n * 2 * K + j] = out[n * 2 * K + K + j] = w[i];
  }
}

enum class Unary { tanh, sigmoid, relu_square };

template <Unary U>
__global__ void unary_kernel(float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = x[i];
    if constexpr (U == Unary::tanh) x[i] = tanhf(v);
    else if constexpr (U == Unary::sigmoid) x[i] = 1.0f / (1.0f + expf(-v));
    else {
      const float r = v > 0.f ? v : 0.f;
      x[i] = r * r;
    }
  }
}

__global__ void add_kernel(float* x, const float* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) x[i] += y[i];
}

__global__ void shift_mix_kernel(const float* x, const float* delta, const float* mu, int64_t n, int64_t C, float* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = x[i] + delta[i] * mu[i % C];
}

__device__ int find_seq(const int64_t* row_start, int n_seq, int64_t t) {
  int lo = 0, hi = n_seq - 1;  // last s with row_start[s] <= t
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (row_start[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

__global__ void token_shift_delta_kernel(const float* x, const float* shift, DeviceBatch b, int64_t C, float* delta) {
  const int64_t T = b.row_start[b.n_seq];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < T * C; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / C, c = i % C;
    const int s = find_seq(b.row_start, b.n_seq, t);
    const float prev = t == b.row_start[s] ? shift[int64_t(b.slot[s]) * C + c] : x[i - C];
    delta[i] = prev - x[i];
  }
}

__global__ void token_shift_store_kernel(const float* x, DeviceBatch b, int64_t C, float* shift) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < int64_t(b.n_seq) * C;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int s = int(i / C);
    const int64_t c = i % C, r0 = b.row_start[s], r1 = b.row_start[s + 1];
    if (r1 > r0) shift[int64_t(b.slot[s]) * C + c] = x[(r1 - 1) * C + c];
  }
}

// token_shift + up to kMaxMixes shift_mix outputs without delta: grid (column blocks, rows), 4 columns per
// thread (16-byte accesses when C % 4 == 0 and every tensor is aligned); rows past gridDim.y loop. The shift
// state is read here (first rows) and written after, by token_shift_store_kernel.
constexpr int kMaxMixes = 8;
struct MixSet {
  const float* mu[kMaxMixes];
  void* out[kMaxMixes];
  unsigned split;  // bit i: out[i] is bf16x2 (rows [hi | lo]), else fp32
  int n;
};
// Value v of column c of row t into a mix output, fp32 or bf16x2.
__device__ __forceinline__ void store_mix(void* out, bool split, int64_t t, int64_t C, int64_t c, float v) {
  if (split) store_split(static_cast<__nv_bfloat16*>(out) + t * 2 * C, C, c, v);
  else static_cast<float*>(out)[t * C + c] = v;
}
__global__ void token_shift_mix_kernel(const float* x, const float* shift, DeviceBatch b, MixSet m, int64_t C,
                                       bool vec4) {
  const int64_t j = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (j >= C) return;
  const int64_t T = b.row_start[b.n_seq];
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    const int s = find_seq(b.row_start, b.n_seq, t);
    const float* xr = x + t * C;
    const float* prev = t == b.row_start[s] ? shift + int64_t(b.slot[s]) * C : xr - C;
    if (vec4) {
      const float4 xv = *reinterpret_cast<const float4*>(xr + j), pv = *reinterpret_cast<const float4*>(prev + j);
      const float4 dv = make_float4(pv.x - xv.x, pv.y - xv.y, pv.z - xv.z, pv.w - xv.w);
      for (int i = 0; i < m.n; ++i) {
        const float4 mu = *reinterpret_cast<const float4*>(m.mu[i] + j);
        const float4 o = make_float4(xv.x + dv.x * mu.x, xv.y + dv.y * mu.y, xv.z + dv.z * mu.z, xv.w + dv.w * mu.w);
        if (m.split >> i & 1) store_split4(static_cast<__nv_bfloat16*>(m.out[i]) + t * 2 * C, C, j, o);
        else *reinterpret_cast<float4*>(static_cast<float*>(m.out[i]) + t * C + j) = o;
      }
    } else {
      for (int64_t c = j; c < j + 4 && c < C; ++c) {
        const float d = prev[c] - xr[c];
        for (int i = 0; i < m.n; ++i) store_mix(m.out[i], m.split >> i & 1, t, C, c, xr[c] + d * m.mu[i][c]);
      }
    }
  }
}

// D[t·m + o] (+)= Σ_i B[t·k + i] · (trans_a ? A[o·k + i] : A[i·m + o]): the GEMM used when cuBLASLt offers no
// algorithm for a shape or alignment (one thread per output, fp32 accumulate).
template <typename T>
__global__ void gemm_fallback_kernel(bool trans_a, const T* A, const T* B, float* D, int64_t m, int64_t n, int64_t k,
                                     bool accumulate) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < m * n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = idx / m, o = idx % m;
    float acc = 0.f;
    for (int64_t i = 0; i < k; ++i) acc += to_f32(B[t * k + i]) * to_f32(trans_a ? A[o * k + i] : A[i * m + o]);
    D[idx] = accumulate ? D[idx] + acc : acc;
  }
}

// Few rows (decode): GEMV-style kernels on fp32 activations and the stored weights, fp32 accumulate (no
// activation rounding; the weights are read once, which is what decode is bound by).
constexpr int kGemvMaxRows = 8;

// out[t, o] = Σ_i x[t, i] W[o, i], W [N, K]: one warp per output o, lanes over i.
template <typename T>
__global__ void gemv_nt_kernel(const float* __restrict__ x, const T* __restrict__ W, int64_t rows, int64_t K, int64_t N,
                               float* __restrict__ out) {
  const int64_t o = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (o >= N) return;
  float acc[kGemvMaxRows] = {};
  const T* wr = W + o * K;
  for (int64_t i = lane; i < K; i += 32) {
    const float wv = to_f32(wr[i]);
#pragma unroll
    for (int t = 0; t < kGemvMaxRows; ++t)
      if (t < rows) acc[t] += x[t * K + i] * wv;
  }
#pragma unroll
  for (int t = 0; t < kGemvMaxRows; ++t) {
    if (t >= rows) break;
    const float v = warp_sum(acc[t]);
    if (lane == 0) out[t * N + o] = v;
  }
}

// out[t, o] = Σ_i x[t, i] W[i, o], W [K, N]: lanes over 32 outputs o, the 8 warps split i, shared-memory sum.
template <typename T>
__global__ void gemv_nn_kernel(const float* __restrict__ x, const T* __restrict__ W, int64_t rows, int64_t K, int64_t N,
                               float* __restrict__ out) {
  __shared__ float part[8][kGemvMaxRows][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int64_t o = blockIdx.x * 32 + lane;
  float acc[kGemvMaxRows] = {};
  if (o < N) {
    for (int64_t i = warp; i < K; i += 8) {
      const float wv = to_f32(W[i * N + o]);
#pragma unroll
      for (int t = 0; t < kGemvMaxRows; ++t)
        if (t < rows) acc[t] += x[t * K + i] * wv;
    }
  }
#pragma unroll
  for (int t = 0; t < kGemvMaxRows; ++t) part[warp][t][lane] = acc[t];
  __syncthreads();
  if (warp == 0 && o < N) {
    for (int t = 0; t < rows; ++t) {
      float v = 0.f;
      for (int w = 0; w < 8; ++w) v += part[w][t][lane];
      out[t * N + o] = v;
    }
  }
}

constexpr int kThreads = 256;
unsigned ew_grid(int64_t n) { return std::min<unsigned>(grid_for(n, kThreads), 65536u); }

}  // namespace

void CudaBackend::embedding(const Tensor& E, const int32_t* ids, int64_t n, Tensor& out) {
  OpTimer timer_(this, "embedding");
  const int64_t C = E.row_size();
  RWKVX_ASSERT(out.rows() == n && out.row_size() == C, "embedding: bad output shape");
  for (int64_t t = 0; t < n; ++t) RWKVX_ASSERT(ids[t] >= 0 && ids[t] < E.rows(), "embedding: id out of range");
  if (n == 0) return;
  Tensor d_ids = scratch(size_t(n) * 4);
  RWKVX_CUDA_CHECK(cudaMemcpyAsync(d_ids.data, ids, size_t(n) * 4, cudaMemcpyHostToDevice, stream_));
  if (E.dtype == DType::bf16)
    embedding_kernel<<<ew_grid(n * C), kThreads, 0, stream_>>>(static_cast<const __nv_bfloat16*>(E.data),
                                                               static_cast<const int32_t*>(d_ids.data), n, C,
                                                               static_cast<float*>(out.data));
  else
    embedding_kernel<<<ew_grid(n * C), kThreads, 0, stream_>>>(static_cast<const float*>(E.data),
                                                               static_cast<const int32_t*>(d_ids.data), n, C,
                                                               static_cast<float*>(out.data));
  RWKVX_CUDA_LAUNCHED();
}

void CudaBackend::layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& out) {
  OpTimer timer_(this, "layer_norm");
  RWKVX_ASSERT(x.numel() == out.numel(), "layer_norm: shapes " + x.shape_str() + " vs " + out.shape_str());
  const int64_t C = w.numel(), T = x.numel() / C;
  if (T == 0) return;
  const auto* xp = static_cast<const float*>(x.data);
  const auto* wp = static_cast<const float*>(w.data);
  const auto* bp = static_cast<const float*>(b.data);
  if (C <= 32 * kLnPerLane)
    layer_norm_warp_kernel<<<unsigned((T + kLnWarps - 1) / kLnWarps), 32 * kLnWarps, 0, stream_>>>(
        xp, wp, bp, eps, T, C, static_cast<float*>(out.data));
  else
    layer_norm_kernel<<<unsigned(T), 256, 0, stream_>>>(xp, wp, bp, eps, C, static_cast<float*>(out.data));
  RWKVX_CUDA_LAUNCHED();
}

void CudaBackend::gemm(bool trans_a, const void* A, cudaDataType ta, const void* B, cudaDataType tb, float* D,
                       int64_t m, int64_t n, int64_t k, bool accumulate) {
  auto align = [](const void* p) {
    const uintptr_t u = reinterpret_cast<uintptr_t>(p);
    return int(u % 16 == 0 ? 16 : u % 8 == 0 ? 8 : u % 4 == 0 ? 4 : 2);
  };
  const int al = std::min({align(A), align(B), align(D)});
  const auto key = std::make_tuple(int(trans_a), int(ta), int(tb), m, n, k, al);
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    auto p = std::make_shared<GemmPlan>();
    RWKVX_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t opa = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, opb = CUBLAS_OP_N;
    RWKVX_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)));
    RWKVX_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)));
    if (trans_a) RWKVX_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->a, ta, uint64_t(k), uint64_t(m), k));
    else RWKVX_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->a, ta, uint64_t(m), uint64_t(k), m));
    RWKVX_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->b, tb, uint64_t(k), uint64_t(n), k));
    RWKVX_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->d, CUDA_R_32F, uint64_t(m), uint64_t(n), m));
    cublasLtMatmulPreference_t pref = nullptr;
    RWKVX_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = workspace_.nbytes();
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    const uint32_t a_bytes = uint32_t(al);
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      cublasLtMatmulPreferenceSetAttribute(pref, attr, &a_bytes, sizeof(a_bytes));
    cublasLtMatmulHeuristicResult_t res{};
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt_, p->op, p->a, p->b, p->d, p->d, pref, 1, &res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0) p->fallback = true;
    else p->algo = res.algo;
    it = plans_.emplace(key, p).first;
  }
  const GemmPlan& p = *it->second;
  if (p.fallback) {
    if (profile_) count_op("gemm_fallback(count)", 0);
    const unsigned g = std::min<unsigned>(grid_for(m * n, kThreads), 65536u);
    if (ta == CUDA_R_16BF)
      gemm_fallback_kernel<<<g, kThreads, 0, stream_>>>(trans_a, static_cast<const __nv_bfloat16*>(A),
                                                        static_cast<const __nv_bfloat16*>(B), D, m, n, k, accumulate);
    else
      gemm_fallback_kernel<<<g, kThreads, 0, stream_>>>(trans_a, static_cast<const float*>(A),
                                                        static_cast<const float*>(B), D, m, n, k, accumulate);
    RWKVX_CUDA_LAUNCHED();
    return;
  }
  OpTimer timer_(this, "gemm (cuBLASLt)");
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  RWKVX_CUBLAS_CHECK(cublasLtMatmul(lt_, p.op, &alpha, A, p.a, B, p.b, &beta, D, p.d, D, p.d, &p.algo,
                                    workspace_.data, workspace_.nbytes(), stream_));
}


void CudaBackend::weight_gemm(bool trans_w, const Tensor& x, const Tensor& W, Tensor& out, int64_t T, int64_t K,
                              int64_t N, bool accumulate) {
  if (x.dtype == DType::bf16x2) {
    // Already split: the doubled weight's GEMM takes it as it is; any other path gets hi + lo back as fp32.
    if (const void* W2 = T > kGemvMaxRows && W.dtype == DType::bf16 && !opt_.single_bf16_activations
                             ? doubled_weight(trans_w, W, K, N)
                             : nullptr) {
      gemm(trans_w, W2, CUDA_R_16BF, x.data, CUDA_R_16BF, static_cast<float*>(out.data), N, T, 2 * K, accumulate);
      return;
    }
    Tensor xf = alloc_uninit(DType::f32, {T, K});
    from_bf16x2_kernel<<<ew_grid(T * K), kThreads, 0, stream_>>>(static_cast<const __nv_bfloat16*>(x.data), T, K,
                                                                 static_cast<float*>(xf.data));
    RWKVX_CUDA_LAUNCHED();
    weight_gemm(trans_w, xf, W, out, T, K, N, accumulate);
    return;
  }
  RWKVX_ASSERT(x.dtype == DType::f32, "GEMM input must be f32 or bf16x2, got " + std::string(dtype_name(x.dtype)));
  if (T <= kGemvMaxRows) {
    RWKVX_ASSERT(!accumulate, "weight_gemm: the GEMV path does not accumulate");
    const float* xp = static_cast<const float*>(x.data);
    float* op = static_cast<float*>(out.data);
    auto launch = [&](auto* w) {
      if (trans_w) gemv_nt_kernel<<<grid_for(N * 32, 256), 256, 0, stream_>>>(xp, w, T, K, N, op);
      else gemv_nn_kernel<<<grid_for(N, 32), 256, 0, stream_>>>(xp, w, T, K, N, op);
    };
    if (W.dtype == DType::bf16) launch(static_cast<const __nv_bfloat16*>(W.data));
    else launch(static_cast<const float*>(W.data));
    RWKVX_CUDA_LAUNCHED();
    return;
  }
  if (W.dtype == DType::f32) {
    gemm(trans_w, W.data, CUDA_R_32F, x.data, CUDA_R_32F, static_cast<float*>(out.data), N, T, K, accumulate);
    return;
  }
  // bf16 weights: the activations go in as bf16 pairs (hi, lo), and out = W·hi + W·lo (the second GEMM adds
  // into the first's output) keeps ~16 mantissa bits of x; single rounding (opt-in) is one GEMM. The
  // products are exact in fp32 either way.
  const int64_t n = T * K;
  const bool split = !opt_.single_bf16_activations;
  if (const void* W2 = split ? doubled_weight(trans_w, W, K, N) : nullptr) {
    split_gemm(trans_w, x, W2, out, T, K, N, accumulate, false);
    return;
  }
  Tensor xb = scratch(size_t(n) * (split ? 4 : 2));
  to_bf16_kernel<<<ew_grid(n), kThreads, 0, stream_>>>(static_cast<const float*>(x.data), n, split,
                                                       static_cast<__nv_bfloat16*>(xb.data));
  RWKVX_CUDA_LAUNCHED();
  if (!split) {
    gemm(trans_w, W.data, CUDA_R_16BF, xb.data, CUDA_R_16BF, static_cast<float*>(out.data), N, T, K, accumulate);
    return;
  }
  float* o = static_cast<float*>(out.data);
  gemm(trans_w, W.data, CUDA_R_16BF, xb.data, CUDA_R_16BF, o, N, T, K, accumulate);
  gemm(trans_w, W.data, CUDA_R_16BF, static_cast<const __nv_bfloat16*>(xb.data) + n, CUDA_R_16BF, o, N, T, K, true);
}

// One GEMM over 2K: [hi | lo] rows of x (of relu(x)² with relu_square) against the doubled weight W2; the
// fp32 output is written once.
void CudaBackend::split_gemm(bool trans_w, const Tensor& x, const void* W2, Tensor& out, int64_t T, int64_t K,
                             int64_t N, bool accumulate, bool relu_square) {
  Tensor xb = scratch(size_t(T * K) * 4);
  const bool vec4 = K % 4 == 0 && aligned16(x.data);
  const dim3 grid = row_quads_grid(T, K, kThreads);
  const auto* xp = static_cast<const float*>(x.data);
  auto* yp = static_cast<__nv_bfloat16*>(xb.data);
  {
    OpTimer timer_(this, "to_bf16_split");
    if (relu_square) to_bf16_split_rows_kernel<true><<<grid, kThreads, 0, stream_>>>(xp, T, K, vec4, yp);
    else to_bf16_split_rows_kernel<false><<<grid, kThreads, 0, stream_>>>(xp, T, K, vec4, yp);
    RWKVX_CUDA_LAUNCHED();
  }
  gemm(trans_w, W2, CUDA_R_16BF, xb.data, CUDA_R_16BF, static_cast<float*>(out.data), N, T, 2 * K, accumulate);
}

void CudaBackend::relu_square_ffn(const Tensor& x, const Tensor& key, const Tensor& value, Tensor& out) {
  const int64_t T = x.rows(), F = key.rows(), C = value.rows();
  const bool fused = T > kGemvMaxRows && value.dtype == DType::bf16 && !opt_.single_bf16_activations;
  const void* V2 = fused ? doubled_weight(true, value, F, C) : nullptr;
  if (!V2) return Backend::relu_square_ffn(x, key, value, out);
  RWKVX_ASSERT(value.row_size() == F && out.rows() == T && out.row_size() == C,
               "relu_square_ffn: key " + key.shape_str() + " value " + value.shape_str() + " out " + out.shape_str());
  Tensor h = alloc_uninit(DType::f32, {T, F});
  linear(x, key, h);
  OpTimer timer_(this, "linear_add");
  split_gemm(true, h, V2, out, T, F, C, true, true);  // relu² applied while splitting h
}

const void* CudaBackend::doubled_weight(bool trans_w, const Tensor& W, int64_t K, int64_t N) {
  if (!W.storage) return nullptr;
  const auto key = std::make_pair(static_cast<const void*>(W.data), trans_w);
  if (auto it = doubled_.find(key); it != doubled_.end()) {
    const DoubledWeight& d = it->second;
    if (!d.owner.expired() && !d.owner.owner_before(W.storage) && !W.storage.owner_before(d.owner)) return d.copy.data;
  }
  // Copies of weights that are gone (or stale at this address) go first.
  for (auto it = doubled_.begin(); it != doubled_.end();) {
    const bool same_key = it->first == key;
    if (it->second.owner.expired() || same_key) {
      doubled_bytes_ -= it->second.copy.nbytes();
      it = doubled_.erase(it);
    } else {
      ++it;
    }
  }
  const size_t bytes = size_t(N * K) * 2 * sizeof(__nv_bfloat16);
  if (doubled_bytes_ + bytes > doubled_budget_) return nullptr;
  DoubledWeight d{W.storage, alloc_uninit(DType::bf16, {2 * N * K})};
  const auto* src = static_cast<const __nv_bfloat16*>(W.data);
  auto* dst = static_cast<__nv_bfloat16*>(d.copy.data);
  if (trans_w) {
    double_rows_kernel<<<ew_grid(N * K), kThreads, 0, stream_>>>(src, N, K, dst);
    RWKVX_CUDA_LAUNCHED();
  } else {
    for (int c = 0; c < 2; ++c)
      RWKVX_CUDA_CHECK(cudaMemcpyAsync(dst + c * N * K, src, size_t(N * K) * 2, cudaMemcpyDeviceToDevice, stream_));
  }
  doubled_bytes_ += bytes;
  return doubled_.emplace(key, std::move(d)).first->second.copy.data;
}

void CudaBackend::forget_doubled(const Tensor& dst) {
  if (dst.dtype != DType::bf16 || doubled_.empty()) return;
  const auto* lo = static_cast<const uint8_t*>(dst.data);
  for (auto it = doubled_.begin(); it != doubled_.end();) {
    const auto* p = static_cast<const uint8_t*>(it->first.first);
    if (p >= lo && p < lo + dst.nbytes()) {
      doubled_bytes_ -= it->second.copy.nbytes();
      it = doubled_.erase(it);
    } else {
      ++it;
    }
  }
}

void CudaBackend::linear(const Tensor& x, const Tensor& W, Tensor& out) {
  OpTimer timer_(this, "linear");
  const int64_t T = x.rows(), K = x.row_size(), N = W.rows();
  RWKVX_ASSERT(W.row_size() == K && out.rows() == T && out.row_size() == N,
               "linear: x " + x.shape_str() + " W " + W.shape_str() + " out " + out.shape_str());
  if (T == 0) return;
  // Column-major view: out^T [N, T] = (W stored [K, N] col-major)^T · x^T [K, T].
  weight_gemm(true, x, W, out, T, K, N);
}

Backend::DeviceFloors CudaBackend::measure_floors() {
  cudaEvent_t e0 = profile_event(), e1 = profile_event();
  // Best time of `reps` runs of f, each timed alone.
  auto best_ms = [&](int reps, auto&& f) {
    float best = 0;
    for (int r = 0; r < reps; ++r) {
      RWKVX_CUDA_CHECK(cudaEventRecord(e0, stream_));
      f();
      RWKVX_CUDA_CHECK(cudaEventRecord(e1, stream_));
      RWKVX_CUDA_CHECK(cudaEventSynchronize(e1));
      float ms = 0;
      RWKVX_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      if (r == 0 || ms < best) best = ms;
    }
    return double(best);
  };
  DeviceFloors f;
  {
    const size_t bytes = size_t(1) << 30;
    Tensor a = scratch(bytes), b = scratch(bytes);
    const double ms = best_ms(6, [&] {
      RWKVX_CUDA_CHECK(cudaMemcpyAsync(b.data, a.data, bytes, cudaMemcpyDeviceToDevice, stream_));
    });
    f.mem_gbps = 2.0 * double(bytes) / (ms * 1e-3) / 1e9;
  }
  {
    const int64_t n = 8192;
    Tensor a = alloc_uninit(DType::bf16, {n, n}), b = alloc_uninit(DType::bf16, {n, n});
    Tensor d = alloc_uninit(DType::f32, {n, n});
    fill_noise_bf16_kernel<<<ew_grid(n * n), kThreads, 0, stream_>>>(static_cast<__nv_bfloat16*>(a.data), n * n, 1u);
    fill_noise_bf16_kernel<<<ew_grid(n * n), kThreads, 0, stream_>>>(static_cast<__nv_bfloat16*>(b.data), n * n, 2u);
    RWKVX_CUDA_LAUNCHED();
    const double ms = best_ms(6, [&] {
      gemm(false, a.data, CUDA_R_16BF, b.data, CUDA_R_16BF, static_cast<float*>(d.data), n, n, n);
    });
    f.matrix_gflops = 2.0 * double(n) * double(n) * double(n) / (ms * 1e-3) / 1e9;
  }
  profile_events_.push_back(e0);
  profile_events_.push_back(e1);
  synchronize();
  f.how = "HBM copy (read + write); bf16 tensor-core GEMM 8192^3 on random data, fp32 accumulate";
  return f;
}

DType CudaBackend::gemm_input_dtype(std::span<const Tensor* const> weights, int64_t rows) const {
  if (rows <= kGemvMaxRows || opt_.single_bf16_activations || doubled_budget_ == 0 || weights.empty())
    return DType::f32;
  for (const Tensor* w : weights)
    if (w->dtype != DType::bf16) return DType::f32;
  return DType::bf16x2;
}

void CudaBackend::linear_add(const Tensor& x, const Tensor& W, Tensor& out) {
  const int64_t T = x.rows(), K = x.row_size(), N = W.rows();
  if (T <= kGemvMaxRows) return Backend::linear_add(x, W, out);  // GEMV kernels write, never add
  OpTimer timer_(this, "linear_add");
  RWKVX_ASSERT(W.row_size() == K && out.rows() == T && out.row_size() == N,
               "linear_add: x " + x.shape_str() + " W " + W.shape_str() + " out " + out.shape_str());
  weight_gemm(true, x, W, out, T, K, N, true);
}

void CudaBackend::matmul(const Tensor& x, const Tensor& W, Tensor& out) {
  OpTimer timer_(this, "matmul");
  const int64_t T = x.rows(), K = x.row_size(), N = W.row_size();
  RWKVX_ASSERT(W.rows() == K && out.rows() == T && out.row_size() == N,
               "matmul: x " + x.shape_str() + " W " + W.shape_str() + " out " + out.shape_str());
  if (T == 0) return;
  // Column-major view: out^T [N, T] = (W stored [N, K] col-major) · x^T [K, T].
  weight_gemm(false, x, W, out, T, K, N);
}

void CudaBackend::tanh_(Tensor& x) {
  OpTimer timer_(this, "tanh_");
  if (!x.numel()) return;
  unary_kernel<Unary::tanh><<<ew_grid(x.numel()), kThreads, 0, stream_>>>(static_cast<float*>(x.data), x.numel());
  RWKVX_CUDA_LAUNCHED();
}
void CudaBackend::sigmoid_(Tensor& x) {
  OpTimer timer_(this, "sigmoid_");
  if (!x.numel()) return;
  unary_kernel<Unary::sigmoid><<<ew_grid(x.numel()), kThreads, 0, stream_>>>(static_cast<float*>(x.data), x.numel());
  RWKVX_CUDA_LAUNCHED();
}
void CudaBackend::relu_square_(Tensor& x) {
  OpTimer timer_(this, "relu_square_");
  if (!x.numel()) return;
  unary_kernel<Unary::relu_square><<<ew_grid(x.numel()), kThreads, 0, stream_>>>(static_cast<float*>(x.data), x.numel());
  RWKVX_CUDA_LAUNCHED();
}
void CudaBackend::add_(Tensor& x, const Tensor& y) {
  OpTimer timer_(this, "add_");
  RWKVX_ASSERT(x.numel() == y.numel(), "add_: shapes " + x.shape_str() + " vs " + y.shape_str());
  if (!x.numel()) return;
  add_kernel<<<ew_grid(x.numel()), kThreads, 0, stream_>>>(static_cast<float*>(x.data), static_cast<const float*>(y.data),
                                                           x.numel());
  RWKVX_CUDA_LAUNCHED();
}

void CudaBackend::token_shift(const Tensor& x, Tensor& shift, const SeqBatch& batch, Tensor& delta) {
  OpTimer timer_(this, "token_shift");
  RWKVX_ASSERT(x.numel() == delta.numel(), "token_shift: shapes " + x.shape_str() + " vs " + delta.shape_str());
  const int64_t C = x.row_size();
  if (batch.n_seq() == 0) return;
  const DeviceBatch b = upload_batch(batch);
  if (batch.n_rows() > 0) {
    token_shift_delta_kernel<<<ew_grid(batch.n_rows() * C), kThreads, 0, stream_>>>(
        static_cast<const float*>(x.data), static_cast<const float*>(shift.data), b, C, static_cast<float*>(delta.data));
    RWKVX_CUDA_LAUNCHED();
  }
  token_shift_store_kernel<<<ew_grid(batch.n_seq() * C), kThreads, 0, stream_>>>(static_cast<const float*>(x.data), b, C,
                                                                                  static_cast<float*>(shift.data));
  RWKVX_CUDA_LAUNCHED();
}

void CudaBackend::shift_mix(const Tensor& x, const Tensor& delta, const Tensor& mu, Tensor& out) {
  OpTimer timer_(this, "shift_mix");
  RWKVX_ASSERT(x.numel() == delta.numel() && x.numel() == out.numel(), "shift_mix: mismatched shapes");
  if (!x.numel()) return;
  shift_mix_kernel<<<ew_grid(x.numel()), kThreads, 0, stream_>>>(
      static_cast<const float*>(x.data), static_cast<const float*>(delta.data), static_cast<const float*>(mu.data),
      x.numel(), mu.numel(), static_cast<float*>(out.data));
  RWKVX_CUDA_LAUNCHED();
}

void CudaBackend::token_shift_mix_n(const Tensor& x, Tensor& shift, const SeqBatch& batch,
                                    std::span<const Tensor* const> mus, std::span<Tensor* const> outs) {
  OpTimer timer_(this, "token_shift_mix");
  RWKVX_ASSERT(mus.size() == outs.size(), "token_shift_mix_n: as many mixes as outputs");
  const int64_t C = x.row_size(), T = x.rows();
  RWKVX_ASSERT(batch.n_rows() == T, "token_shift_mix_n: batch rows vs x " + x.shape_str());
  if (batch.n_seq() == 0) return;
  const DeviceBatch b = upload_batch(batch);
  const bool base_vec4 = C % 4 == 0 && aligned16(x.data) && aligned16(shift.data);
  for (size_t g = 0; g < mus.size() && T > 0; g += kMaxMixes) {  // groups of up to kMaxMixes
    MixSet m{};
    m.n = int(std::min<size_t>(kMaxMixes, mus.size() - g));
    bool vec4 = base_vec4;
    for (int i = 0; i < m.n; ++i) {
      const Tensor &mu = *mus[g + size_t(i)], &out = *outs[g + size_t(i)];
      RWKVX_ASSERT(out.numel() == x.numel() && mu.numel() == C, "token_shift_mix_n: mismatched shapes");
      RWKVX_ASSERT(out.dtype == DType::f32 || out.dtype == DType::bf16x2, "token_shift_mix_n: outputs are f32 or bf16x2");
      m.mu[i] = static_cast<const float*>(mu.data);
      m.out[i] = out.data;
      if (out.dtype == DType::bf16x2) m.split |= 1u << i;
      vec4 = vec4 && aligned16(mu.data) && aligned16(out.data);
    }
    token_shift_mix_kernel<<<row_quads_grid(T, C, kThreads), kThreads, 0, stream_>>>(static_cast<const float*>(x.data),
                                                          static_cast<const float*>(shift.data), b, m, C, vec4);
    RWKVX_CUDA_LAUNCHED();
  }
  token_shift_store_kernel<<<ew_grid(batch.n_seq() * C), kThreads, 0, stream_>>>(static_cast<const float*>(x.data), b, C,
                                                                                  static_cast<float*>(shift.data));
  RWKVX_CUDA_LAUNCHED();
}

}  // namespace cuda
}  // namespace rwkvx
