// CUDA kernels of the training ops other than the WKV-7 recurrence and the sparse attention: elementwise
// activations, token shift and its lerp, group/layer norm, the fused RWKV-7 time-mix pieces, the embedding,
// the head's cross-entropy rows and the AdamW step (contract: train_ops_cuda.h; reference: the CPU ops of
// the same names in src/train/ops/ and src/train/optimizer.cpp).
//
// Shapes of the kernels:
//   - elementwise ops: grid-stride maps, 16-byte vector loads when every pointer is aligned (and, for ops
//     that index a [C] vector, C is a multiple of the vector width), scalar otherwise;
//   - per-row statistics (a norm group, a head): one warp per row, warp shuffles in double;
//   - gradients that sum over tokens: a "column" kernel, one thread per channel and one block row per block
//     of tokens, does the elementwise outputs and writes each token block's partial sum (double) to stream
//     scratch; a second kernel adds the partials in token-block order into the gradient. The token blocks
//     depend on T alone, so a result never depends on timing or on the GPU model: no float atomics anywhere;
//   - cross-entropy rows (V up to 65536): one block per row, fixed-shape tree reductions.
// Arithmetic follows the CPU reference: where it computes in double (statistics, sigmoids, the fused
// pieces) so do these kernels, also for S = float; where it computes in S, so do they.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "backend/cuda/cuda_internal.h"
#include "train/cuda/train_ops_cuda.h"

namespace rwkvx::train::cuda {
namespace {

constexpr int kThreads = 256;     // elementwise and row-kernel blocks
constexpr int kColThreads = 128;  // channels per column-kernel block
constexpr int kRowThreads = 1024;  // cross-entropy: one block per row of V logits

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
unsigned blocks_for(int64_t work, int threads, int64_t cap = int64_t(1) << 16) {
  return unsigned(std::clamp<int64_t>(ceil_div(work, threads), 1, cap));
}

// Lanes per row of the row kernels (see seg_sum): f(std::integral_constant<int, L>).
template <class F>
void with_row_lanes(int64_t row_len, F&& f) {
  if (row_len <= 128) f(std::integral_constant<int, 8>{});
  else f(std::integral_constant<int, 32>{});
}
unsigned row_blocks(int64_t rows, int lanes) { return blocks_for(rows, kThreads / lanes); }

// The decay's constant -e^{-1/2}, computed on the host as the CPU does.
template <class S>
S decay_scale() {
  return S(-std::exp(-0.5));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
template <class... P>
bool all_aligned16(const P*... p) {
  return (aligned16(p) && ...);
}

// Stream-ordered scratch (the stream's memory pool), released after the work enqueued before it.
class StreamScratch {
 public:
  StreamScratch(cudaStream_t st, size_t bytes) : st_(st) {
    if (bytes) RWKVX_CUDA_CHECK(cudaMallocAsync(&p_, bytes, st));
  }
  ~StreamScratch() {
    if (p_) cudaFreeAsync(p_, st_);
  }
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p_);
  }

 private:
  cudaStream_t st_;
  void* p_ = nullptr;
};

// ---- device helpers -----------------------------------------------------------------------------------

template <class S>
constexpr int kPack = 16 / int(sizeof(S));

template <int K, class S>
__device__ __forceinline__ void load(const S* p, S (&r)[K]) {
  if constexpr (K == 1) {
    r[0] = *p;
  } else if constexpr (std::is_same_v<S, float>) {
    static_assert(K == 4);
    const float4 q = *reinterpret_cast<const float4*>(p);
    r[0] = q.x, r[1] = q.y, r[2] = q.z, r[3] = q.w;
  } else {
    static_assert(K == 2);
    const double2 q = *reinterpret_cast<const double2*>(p);
    r[0] = q.x, r[1] = q.y;
  }
}
template <int K, class S>
__device__ __forceinline__ void store(S* p, const S (&r)[K]) {
  if constexpr (K == 1) {
    *p = r[0];
  } else if constexpr (std::is_same_v<S, float>) {
    *reinterpret_cast<float4*>(p) = make_float4(r[0], r[1], r[2], r[3]);
  } else {
    *reinterpret_cast<double2*>(p) = make_double2(r[0], r[1]);
  }
}

__device__ __forceinline__ float dev_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double dev_tanh(double x) { return tanh(x); }
// Transcendentals in S: fp32 ones for S = float (within an ulp or two of the CPU's double-then-rounded
// values, and ~10x cheaper than fp64 ones, which made the fused time-mix kernels compute-bound), fp64 ones,
// the CPU's exact expressions, for S = double.
__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float sigm(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ double sigm(double x) { return 1.0 / (1.0 + exp(-x)); }

// Sum over the warp in a fixed tree, broadcast from lane 0 (every lane gets the same bits).
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return __shfl_sync(0xffffffffu, v, 0);
}

__device__ __forceinline__ int64_t warp_id_global() { return (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; }

// Row kernels: a row (a norm group, a head) belongs to a segment of L lanes (L = 8 for rows up to 128
// elements: 3 shuffle levels per reduction instead of 5, which bound the 64-channel heads), and a warp
// takes 32/L consecutive rows per step. The sum is a fixed tree broadcast from the segment's lane 0.
template <int L>
__device__ __forceinline__ double seg_sum(double v) {
#pragma unroll
  for (int o = L / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o, L);
  return __shfl_sync(0xffffffffu, v, 0, L);
}
// The row loop (its element loops are unrolled so that a lane's loads are in flight together):
// `r - sub < rows` is the warp's own condition (sub = this segment's place in its warp), so
// every lane of a warp runs the same iterations and the shuffles see the whole warp; `ok` guards the rows
// past the end.
#define RWKVX_FOR_ROWS(L, rows)                                                                  \
  const int lane = int(threadIdx.x) & ((L)-1), sub = (int(threadIdx.x) & 31) / (L);              \
  const int64_t n_seg_ = int64_t(gridDim.x) * (blockDim.x / (L));                                \
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / (L); r - sub < (rows); r += n_seg_)

// ---- elementwise maps ----------------------------------------------------------------------------------

// f.run<K>(i) handles elements [i, i + K): K = kPack<S> (16-byte accesses, i a multiple of K) when `vec`,
// else K = 1.
template <class S, class F>
__global__ void __launch_bounds__(kThreads) map_kernel(F f, int64_t n, bool vec) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec) {
    constexpr int K = kPack<S>;
    const int64_t np = n / K;
    for (int64_t p = tid; p < np; p += stride) f.template run<K>(p * K);
    done = np * K;
  }
  for (int64_t i = done + tid; i < n; i += stride) f.template run<1>(i);
}

template <class S, class F>
void launch_map(cudaStream_t st, const F& f, int64_t n, bool vec) {
  if (n <= 0) return;
  map_kernel<S><<<blocks_for(vec ? n / kPack<S> + 1 : n, kThreads), kThreads, 0, st>>>(f, n, vec);
  RWKVX_CUDA_LAUNCHED();
}

template <class S>
struct TanhFwd {
  const S* x;
  S* y;
  template <int K>
  __device__ void run(int64_t i) const {
    S v[K];
    load<K>(x + i, v);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] = dev_tanh(v[j]);
    store<K>(y + i, v);
  }
};
template <class S>
struct SigmoidFwd {
  const S* x;
  S* y;
  template <int K>
  __device__ void run(int64_t i) const {
    S v[K];
    load<K>(x + i, v);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] = sigm(v[j]);
    store<K>(y + i, v);
  }
};
template <class S>
struct ReluSquareFwd {
  const S* x;
  S* y;
  template <int K>
  __device__ void run(int64_t i) const {
    S v[K];
    load<K>(x + i, v);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const S r = v[j] > S(0) ? v[j] : S(0);
      v[j] = r * r;
    }
    store<K>(y + i, v);
  }
};

enum class Grad { tanh, sigmoid, relu_square, add };
// dx += f(dy, y): the backward of an activation (add: y += x, with dy = x).
template <class S, Grad G>
struct GradAdd {
  const S* dy;
  const S* y;
  S* dx;
  template <int K>
  __device__ void run(int64_t i) const {
    S a[K], b[K], d[K];
    load<K>(dy + i, a);
    if constexpr (G != Grad::add) load<K>(y + i, b);
    load<K>(dx + i, d);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      if constexpr (G == Grad::tanh) d[j] += a[j] * (S(1) - b[j] * b[j]);
      else if constexpr (G == Grad::sigmoid) d[j] += a[j] * b[j] * (S(1) - b[j]);
      else if constexpr (G == Grad::relu_square) d[j] += S(2) * a[j] * (b[j] > S(0) ? b[j] : S(0));
      else d[j] += a[j];
    }
    store<K>(dx + i, d);
  }
};

// delta[t] = x[t-1] - x[t] (x[-1] = 0). Vector packs never straddle rows (C is a multiple of K).
template <class S>
struct TokenShiftFwd {
  const S* x;
  S* delta;
  int64_t C;
  template <int K>
  __device__ void run(int64_t i) const {
    S cur[K], prev[K];
    load<K>(x + i, cur);
    if (i >= C) {
      load<K>(x + i - C, prev);
    } else {
#pragma unroll
      for (int j = 0; j < K; ++j) prev[j] = S(0);
    }
#pragma unroll
    for (int j = 0; j < K; ++j) prev[j] -= cur[j];
    store<K>(delta + i, prev);
  }
};
// dx[t] -= ddelta[t], then dx[t] += ddelta[t+1] (the CPU loop's order for each element).
template <class S>
struct TokenShiftBwd {
  const S* dd;
  S* dx;
  int64_t C, n;
  template <int K>
  __device__ void run(int64_t i) const {
    S d[K], a[K], b[K];
    load<K>(dx + i, d);
    load<K>(dd + i, a);
#pragma unroll
    for (int j = 0; j < K; ++j) d[j] -= a[j];
    if (i + C < n) {
      load<K>(dd + i + C, b);
#pragma unroll
      for (int j = 0; j < K; ++j) d[j] += b[j];
    }
    store<K>(dx + i, d);
  }
};

template <class S>
struct ShiftMixFwd {
  const S* x;
  const S* delta;
  const S* mu;
  S* out;
  int64_t C;
  template <int K>
  __device__ void run(int64_t i) const {
    S a[K], d[K], m[K];
    load<K>(x + i, a);
    load<K>(delta + i, d);
    load<K>(mu + i % C, m);
#pragma unroll
    for (int j = 0; j < K; ++j) a[j] = a[j] + d[j] * m[j];
    store<K>(out + i, a);
  }
};

// out = v + (v_first - v) ⊙ σ(v0 + vg).
template <class S>
struct ValueResidualFwd {
  const S* v;
  const S* vf;
  const S* vg;
  const S* v0;
  S* out;
  int64_t C;
  template <int K>
  __device__ void run(int64_t i) const {
    S a[K], f[K], g[K], z[K];
    load<K>(v + i, a);
    load<K>(vf + i, f);
    load<K>(vg + i, g);
    load<K>(v0 + i % C, z);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const S s = sigm(S(z[j] + g[j]));
      a[j] = a[j] + (f[j] - a[j]) * s;
    }
    store<K>(out + i, a);
  }
};

template <class S>
struct EmbeddingFwd {
  const S* E;
  const int32_t* ids;
  S* out;
  int64_t C;
  template <int K>
  __device__ void run(int64_t i) const {
    const int64_t t = i / C, c = i % C;
    S v[K];
    load<K>(E + int64_t(ids[t]) * C + c, v);
    store<K>(out + i, v);
  }
};

struct ScaleFwd {
  float* g;
  double scale;
  template <int K>
  __device__ void run(int64_t i) const {
    float v[K];
    load<K>(g + i, v);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] = float(__dmul_rn(double(v[j]), scale));
    store<K>(g + i, v);
  }
};

// AdamW::step's arithmetic, operation for operation: the _rn intrinsics keep nvcc from fusing a multiply
// and an add, so the result is the CPU's to the bit.
struct AdamWStep {
  float* p;
  const float* g;
  float* m;
  float* v;
  double lr, wd, b1, one_minus_b1, b2, one_minus_b2, eps, bc1, bc2_sqrt;
  template <int K>
  __device__ void run(int64_t i) const {
    float pp[K], gg[K], mm[K], vv[K];
    load<K>(p + i, pp);
    load<K>(g + i, gg);
    load<K>(m + i, mm);
    load<K>(v + i, vv);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const double gd = gg[j];
      mm[j] = float(__dadd_rn(__dmul_rn(b1, double(mm[j])), __dmul_rn(one_minus_b1, gd)));
      vv[j] = float(__dadd_rn(__dmul_rn(b2, double(vv[j])), __dmul_rn(__dmul_rn(one_minus_b2, gd), gd)));
      const double denom = __dadd_rn(__ddiv_rn(__dsqrt_rn(double(vv[j])), bc2_sqrt), eps);
      const double update = __dadd_rn(__ddiv_rn(__ddiv_rn(double(mm[j]), bc1), denom), __dmul_rn(wd, double(pp[j])));
      pp[j] = float(__dsub_rn(double(pp[j]), __dmul_rn(lr, update)));
    }
    store<K>(p + i, pp);
    store<K>(m + i, mm);
    store<K>(v + i, vv);
  }
};

// ---- reductions over tokens: token blocks and their ordered sum ------------------------------------------

// Blocks of at least 32 tokens, at most 512 of them (enough blocks to fill the GPU at T = 64K, C = 768).
struct TokenBlocks {
  int64_t size, count;
};
TokenBlocks token_blocks(int64_t T) {
  const int64_t size = std::max<int64_t>(32, ceil_div(T, 512));
  return {size, ceil_div(T, size)};
}

// Up to four [C] gradients reduced by one column kernel; partial sums at part[(g·C + c)·n_tb + tb].
template <class S>
struct GradOut {
  S* p[4] = {nullptr, nullptr, nullptr, nullptr};
};

// out.p[g][c] += Σ_tb part[g][c][tb]: one warp per (g, c), lanes stride the token blocks, then a fixed tree.
template <class S>
__global__ void __launch_bounds__(kThreads) add_partials_kernel(const double* __restrict__ part, int64_t n_tb,
                                                                 int64_t C, int n_out, GradOut<S> out) {
  const int64_t w = warp_id_global();
  if (w >= n_out * C) return;
  const int g = int(w / C);
  const int64_t c = w % C;
  S* o = g == 0 ? out.p[0] : g == 1 ? out.p[1] : g == 2 ? out.p[2] : out.p[3];  // no local-memory indexing
  if (!o) return;
  const int lane = threadIdx.x & 31;
  const double* src = part + (g * C + c) * n_tb;
  double s = 0;
  for (int64_t tb = lane; tb < n_tb; tb += 32) s += src[tb];
  s = warp_sum(s);
  if (lane == 0) o[c] += S(s);
}

template <class S>
void add_partials(cudaStream_t st, const double* part, const TokenBlocks& tb, int64_t C, int n_out,
                  const GradOut<S>& out) {
  add_partials_kernel<S><<<blocks_for(n_out * C * 32, kThreads, int64_t(1) << 30), kThreads, 0, st>>>(part, tb.count,
                                                                                                       C, n_out, out);
  RWKVX_CUDA_LAUNCHED();
}

dim3 column_grid(int64_t C, const TokenBlocks& tb) { return dim3(unsigned(ceil_div(C, kColThreads)), unsigned(tb.count)); }

// The channel and token range of a column-kernel thread; false when the thread has no channel.
struct ColumnRange {
  int64_t c, t0, t1, tb;
};
__device__ __forceinline__ bool column_range(int64_t C, int64_t T, int64_t tb_size, ColumnRange& r) {
  r.c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  r.tb = blockIdx.y;
  r.t0 = r.tb * tb_size;
  r.t1 = r.t0 + tb_size < T ? r.t0 + tb_size : T;
  return r.c < C;
}

// ---- shift_mix backward ------------------------------------------------------------------------------

template <class S>
__global__ void __launch_bounds__(kColThreads)
    shift_mix_backward_kernel(const S* __restrict__ dout, const S* __restrict__ delta, const S* __restrict__ mu,
                              S* dx, S* ddelta, double* part, int64_t T, int64_t C, int64_t tb_size, int64_t n_tb) {
  ColumnRange r;
  if (!column_range(C, T, tb_size, r)) return;
  const S m = mu[r.c];
  double acc = 0;
#pragma unroll 4
  for (int64_t t = r.t0; t < r.t1; ++t) {
    const int64_t i = t * C + r.c;
    const S d = dout[i];
    if (dx) dx[i] += d;
    if (ddelta) ddelta[i] += d * m;
    acc += double(d) * double(delta[i]);
  }
  if (part) part[r.c * n_tb + r.tb] = acc;
}

// ---- group norm ----------------------------------------------------------------------------------------

// Group row r = t·(C/G) + g: its G channels are contiguous at x + r·G.
template <class S, int L>
__global__ void __launch_bounds__(kThreads)
    group_norm_forward_kernel(const S* x, const S* __restrict__ w, const S* __restrict__ b, S* y, S* mean, S* rstd,
                              int64_t rows, int64_t C, int64_t G, double eps) {
  const int64_t n_groups = C / G;
  RWKVX_FOR_ROWS(L, rows) {
    const bool ok = r < rows;
    const S* xr = x + r * G;
    S* yr = y + r * G;
    const int64_t c0 = (r % n_groups) * G;
    double s = 0;
    #pragma unroll 4
    for (int64_t i = lane; ok && i < G; i += L) s += double(xr[i]);
    const double mu = seg_sum<L>(s) / double(G);
    double v = 0;
    #pragma unroll 4
    for (int64_t i = lane; ok && i < G; i += L) {
      const double d = double(xr[i]) - mu;
      v += d * d;
    }
    const double inv = 1.0 / sqrt(seg_sum<L>(v) / double(G) + eps);
    #pragma unroll 4
    for (int64_t i = lane; ok && i < G; i += L)
      yr[i] = S((double(xr[i]) - mu) * inv * double(w[c0 + i]) + double(b[c0 + i]));
    if (ok && lane == 0) mean[r] = S(mu), rstd[r] = S(inv);
  }
}

// Per group row: m1 = mean(dy ⊙ w), m2 = mean(dy ⊙ w ⊙ x̂).
template <class S, int L>
__global__ void __launch_bounds__(kThreads)
    group_norm_stats_kernel(const S* __restrict__ dy, const S* __restrict__ x, const S* __restrict__ w,
                            const S* __restrict__ mean, const S* __restrict__ rstd, double2* stats, int64_t rows,
                            int64_t C, int64_t G) {
  const int64_t n_groups = C / G;
  RWKVX_FOR_ROWS(L, rows) {
    const bool ok = r < rows;
    const int64_t o = r * G, c0 = (r % n_groups) * G;
    const double mu = ok ? double(mean[r]) : 0.0, inv = ok ? double(rstd[r]) : 0.0;
    double m1 = 0, m2 = 0;
    #pragma unroll 4
    for (int64_t i = lane; ok && i < G; i += L) {
      const double xh = (double(x[o + i]) - mu) * inv, dxh = double(dy[o + i]) * double(w[c0 + i]);
      m1 += dxh;
      m2 += dxh * xh;
    }
    m1 = seg_sum<L>(m1), m2 = seg_sum<L>(m2);
    if (ok && lane == 0) stats[r] = make_double2(m1 / double(G), m2 / double(G));
  }
}

// dx (with the row statistics) and the token-block partials of dw = Σ dy ⊙ x̂, db = Σ dy.
template <class S>
__global__ void __launch_bounds__(kColThreads)
    group_norm_backward_kernel(const S* __restrict__ dy, const S* __restrict__ x, const S* __restrict__ w,
                               const S* __restrict__ mean, const S* __restrict__ rstd,
                               const double2* __restrict__ stats, S* dx, double* part, int64_t T, int64_t C, int64_t G,
                               int64_t tb_size, int64_t n_tb) {
  ColumnRange r;
  if (!column_range(C, T, tb_size, r)) return;
  const int64_t n_groups = C / G, g = r.c / G;
  const double wc = double(w[r.c]);
  double acc_w = 0, acc_b = 0;
#pragma unroll 4
  for (int64_t t = r.t0; t < r.t1; ++t) {
    const int64_t i = t * C + r.c, row = t * n_groups + g;
    const double mu = double(mean[row]), inv = double(rstd[row]);
    const double xh = (double(x[i]) - mu) * inv, d = double(dy[i]);
    if (dx) {
      const double2 m = stats[row];
      dx[i] += S(inv * (d * wc - m.x - xh * m.y));
    }
    acc_w += d * xh;
    acc_b += d;
  }
  if (part) {
    part[r.c * n_tb + r.tb] = acc_w;
    part[(C + r.c) * n_tb + r.tb] = acc_b;
  }
}

// ---- wkv inputs --------------------------------------------------------------------------------------

// Per (t, head): the L2 norm of kk = k ⊙ k_k, then every output of the row.
template <class S, int L>
__global__ void __launch_bounds__(kThreads)
    wkv_inputs_forward_kernel(const S* __restrict__ wl, const S* __restrict__ al, const S* __restrict__ k,
                              const S* __restrict__ w0, const S* __restrict__ a0, const S* __restrict__ k_k,
                              const S* __restrict__ k_a, S* w, S* a, S* alpha, S* beta, S* k_out, int64_t rows,
                              int64_t C, int64_t N, S c_w) {
  const int64_t H = C / N;
  RWKVX_FOR_ROWS(L, rows) {
    const bool ok = r < rows;
    const int64_t o = r * N, c0 = (r % H) * N;
    double norm = 0;
    #pragma unroll 4
    for (int64_t j = lane; ok && j < N; j += L) {
      const double kk = double(k[o + j]) * double(k_k[c0 + j]);
      norm += kk * kk;
    }
    const double inv = 1.0 / fmax(sqrt(seg_sum<L>(norm)), 1e-12);
    #pragma unroll 4
    for (int64_t j = lane; ok && j < N; j += L) {
      const int64_t i = o + j, c = c0 + j;
      w[i] = dev_exp(c_w / (S(1) + dev_exp(-S(w0[c] + wl[i]))));
      const S av = sigm(S(a0[c] + al[i]));
      a[i] = av;
      const S kk = S(double(k[i]) * double(k_k[c]) * inv);
      alpha[i] = -kk;
      beta[i] = kk * av;
      k_out[i] = k[i] * (S(1) + (av - S(1)) * k_a[c]);
    }
  }
}

// Per (t, head): ‖k ⊙ k_k‖, its clamped inverse, and kk · dkk with dkk = -dalpha + dbeta ⊙ a.
struct NormStats {
  double norm, inv, dot;
};
template <class S, int L>
__global__ void __launch_bounds__(kThreads)
    wkv_inputs_stats_kernel(const S* __restrict__ dalpha, const S* __restrict__ dbeta, const S* __restrict__ al,
                            const S* __restrict__ k, const S* __restrict__ a0, const S* __restrict__ k_k,
                            NormStats* stats, int64_t rows, int64_t C, int64_t N) {
  const int64_t H = C / N;
  RWKVX_FOR_ROWS(L, rows) {
    const bool ok = r < rows;
    const int64_t o = r * N, c0 = (r % H) * N;
    double norm = 0;
    #pragma unroll 4
    for (int64_t j = lane; ok && j < N; j += L) {
      const double x = double(k[o + j]) * double(k_k[c0 + j]);
      norm += x * x;
    }
    norm = sqrt(seg_sum<L>(norm));
    const double inv = 1.0 / fmax(norm, 1e-12);
    double dot = 0;
    #pragma unroll 4
    for (int64_t j = lane; ok && j < N; j += L) {
      const int64_t i = o + j, c = c0 + j;
      const double a = double(sigm(S(a0[c] + al[i])));
      const double kk = double(k[i]) * double(k_k[c]) * inv;
      dot += kk * (-double(dalpha[i]) + double(dbeta[i]) * a);
    }
    dot = seg_sum<L>(dot);
    if (ok && lane == 0) stats[r] = NormStats{norm, inv, dot};
  }
}

// Elementwise gradients and the token-block partials of dw0, da0, dk_k, dk_a (in that order).
template <class S>
__global__ void __launch_bounds__(kColThreads)
    wkv_inputs_backward_kernel(const S* __restrict__ dw, const S* __restrict__ dalpha, const S* __restrict__ dbeta,
                               const S* __restrict__ dk_out, const S* __restrict__ wl, const S* __restrict__ al,
                               const S* __restrict__ k, const S* __restrict__ w0, const S* __restrict__ a0,
                               const S* __restrict__ k_k, const S* __restrict__ k_a,
                               const NormStats* __restrict__ stats, S* dwl, S* dal, S* dk, double* part, int64_t T,
                               int64_t C, int64_t N, S c_w, int64_t tb_size, int64_t n_tb) {
  ColumnRange r;
  if (!column_range(C, T, tb_size, r)) return;
  const int64_t c = r.c, H = C / N, h = c / N;
  const double kkc = double(k_k[c]), kac = double(k_a[c]), cw = double(c_w);
  const S a0c = a0[c], w0c = w0[c];
  double acc_w0 = 0, acc_a0 = 0, acc_kk = 0, acc_ka = 0;
#pragma unroll 2
  for (int64_t t = r.t0; t < r.t1; ++t) {
    const int64_t i = t * C + c;
    const NormStats st = stats[t * H + h];
    const double kv = double(k[i]), dko = double(dk_out[i]), db = double(dbeta[i]);
    const double a = double(sigm(S(a0c + al[i])));
    const double kk = kv * kkc * st.inv;
    const double dkk = -double(dalpha[i]) + db * a;
    // d(x / ‖x‖) = (dkk - kk (kk · dkk)) / ‖x‖ above the norm's clamp, dkk / 1e-12 below it.
    const double dxn = st.norm > 1e-12 ? (dkk - kk * st.dot) * st.inv : dkk * st.inv;
    if (dk) {
      S v = dk[i];
      v += S(dxn * kkc);
      v += S(dko * (1.0 + (a - 1.0) * kac));
      dk[i] = v;
    }
    acc_kk += dxn * kv;
    const double da = db * kk + dko * kv * kac;
    acc_ka += dko * kv * (a - 1.0);
    const double dza = da * a * (1.0 - a);
    if (dal) dal[i] += S(dza);
    acc_a0 += dza;
    const S sw = sigm(S(w0c + wl[i]));
    const double s = double(sw), wv = double(dev_exp(S(c_w * sw)));
    const double dzw = double(dw[i]) * wv * cw * s * (1.0 - s);
    if (dwl) dwl[i] += S(dzw);
    acc_w0 += dzw;
  }
  if (part) {
    part[(0 * C + c) * n_tb + r.tb] = acc_w0;
    part[(1 * C + c) * n_tb + r.tb] = acc_a0;
    part[(2 * C + c) * n_tb + r.tb] = acc_kk;
    part[(3 * C + c) * n_tb + r.tb] = acc_ka;
  }
}

// ---- value residual backward ------------------------------------------------------------------------

template <class S>
__global__ void __launch_bounds__(kColThreads)
    value_residual_backward_kernel(const S* __restrict__ dout, const S* __restrict__ v, const S* __restrict__ vf,
                                   const S* __restrict__ vg, const S* __restrict__ v0, S* dv, S* dvf, S* dvg,
                                   double* part, int64_t T, int64_t C, int64_t tb_size, int64_t n_tb) {
  ColumnRange r;
  if (!column_range(C, T, tb_size, r)) return;
  const S v0c = v0[r.c];
  double acc = 0;
#pragma unroll 4
  for (int64_t t = r.t0; t < r.t1; ++t) {
    const int64_t i = t * C + r.c;
    const double g = double(sigm(S(v0c + vg[i]))), d = double(dout[i]);
    if (dv) dv[i] += S(d * (1.0 - g));
    if (dvf) dvf[i] += S(d * g);
    const double dz = d * (double(vf[i]) - double(v[i])) * g * (1.0 - g);
    if (dvg) dvg[i] += S(dz);
    acc += dz;
  }
  if (part) part[r.c * n_tb + r.tb] = acc;
}

// ---- rwkv7 output --------------------------------------------------------------------------------------

// Per (t, head): GroupNorm of y over the head, plus the bonus (Σ r k r_k) v, times the gate. The
// normalised value is rounded to S before the bonus is added, as on the CPU (which writes it to out first).
template <class S, int L>
__global__ void __launch_bounds__(kThreads)
    rwkv7_output_forward_kernel(const S* y, const S* __restrict__ rr, const S* __restrict__ k,
                                const S* __restrict__ v, const S* __restrict__ r_k, const S* __restrict__ g,
                                const S* __restrict__ ln_w, const S* __restrict__ ln_b, double eps, S* out, S* mean,
                                S* rstd, int64_t rows, int64_t C, int64_t N) {
  const int64_t H = C / N;
  RWKVX_FOR_ROWS(L, rows) {
    const bool ok = r < rows;
    const int64_t o = r * N, c0 = (r % H) * N;
    double s = 0, u = 0;
    #pragma unroll 4
    for (int64_t j = lane; ok && j < N; j += L) {
      s += double(y[o + j]);
      u += double(rr[o + j]) * double(k[o + j]) * double(r_k[c0 + j]);
    }
    const double mu = seg_sum<L>(s) / double(N);
    u = seg_sum<L>(u);
    double var = 0;
    #pragma unroll 4
    for (int64_t j = lane; ok && j < N; j += L) {
      const double d = double(y[o + j]) - mu;
      var += d * d;
    }
    const double inv = 1.0 / sqrt(seg_sum<L>(var) / double(N) + eps);
    #pragma unroll 4
    for (int64_t j = lane; ok && j < N; j += L) {
      const int64_t i = o + j, c = c0 + j;
      const S gn = S((double(y[i]) - mu) * inv * double(ln_w[c]) + double(ln_b[c]));
      out[i] = S((double(gn) + u * double(v[i])) * double(g[i]));
    }
    if (ok && lane == 0) mean[r] = S(mu), rstd[r] = S(inv);
  }
}

struct OutputStats {
  double u, du, m1, m2;
};

// Per (t, head): u = Σ r k r_k, du = Σ dout g v, and the GroupNorm backward means m1, m2 of dgn ⊙ ln_w
// (dgn = dout ⊙ g rounded to S, the CPU's intermediate).
template <class S, int L>
__global__ void __launch_bounds__(kThreads)
    rwkv7_output_stats_kernel(const S* __restrict__ dout, const S* __restrict__ y, const S* __restrict__ rr,
                              const S* __restrict__ k, const S* __restrict__ v, const S* __restrict__ r_k,
                              const S* __restrict__ g, const S* __restrict__ ln_w, const S* __restrict__ mean,
                              const S* __restrict__ rstd, OutputStats* stats, int64_t rows, int64_t C, int64_t N) {
  const int64_t H = C / N;
  RWKVX_FOR_ROWS(L, rows) {
    const bool ok = r < rows;
    const int64_t o = r * N, c0 = (r % H) * N;
    const double mu = ok ? double(mean[r]) : 0.0, inv = ok ? double(rstd[r]) : 0.0;
    double u = 0, du = 0, m1 = 0, m2 = 0;
    #pragma unroll 4
    for (int64_t j = lane; ok && j < N; j += L) {
      const int64_t i = o + j, c = c0 + j;
      const double d = double(dout[i]);
      u += double(rr[i]) * double(k[i]) * double(r_k[c]);
      du += d * double(g[i]) * double(v[i]);
      const double dxh = double(S(d * double(g[i]))) * double(ln_w[c]);
      m1 += dxh;
      m2 += dxh * ((double(y[i]) - mu) * inv);
    }
    u = seg_sum<L>(u), du = seg_sum<L>(du), m1 = seg_sum<L>(m1), m2 = seg_sum<L>(m2);
    if (ok && lane == 0) stats[r] = OutputStats{u, du, m1 / double(N), m2 / double(N)};
  }
}

// Elementwise gradients and the token-block partials of dr_k, dln_w, dln_b (in that order).
template <class S>
__global__ void __launch_bounds__(kColThreads)
    rwkv7_output_backward_kernel(const S* __restrict__ dout, const S* __restrict__ y, const S* __restrict__ rr,
                                 const S* __restrict__ k, const S* __restrict__ v, const S* __restrict__ r_k,
                                 const S* __restrict__ g, const S* __restrict__ ln_w, const S* __restrict__ ln_b,
                                 const S* __restrict__ mean, const S* __restrict__ rstd,
                                 const OutputStats* __restrict__ stats, S* dy, S* dr, S* dk, S* dv, S* dg,
                                 double* part, int64_t T, int64_t C, int64_t N, int64_t tb_size, int64_t n_tb) {
  ColumnRange r;
  if (!column_range(C, T, tb_size, r)) return;
  const int64_t c = r.c, H = C / N, h = c / N;
  const double rk = double(r_k[c]), lw = double(ln_w[c]), lb = double(ln_b[c]);
  double acc_rk = 0, acc_w = 0, acc_b = 0;
#pragma unroll 2
  for (int64_t t = r.t0; t < r.t1; ++t) {
    const int64_t i = t * C + c, row = t * H + h;
    const OutputStats st = stats[row];
    const double mu = double(mean[row]), inv = double(rstd[row]);
    const double d = double(dout[i]), gi = double(g[i]), vi = double(v[i]), ri = double(rr[i]), ki = double(k[i]);
    const double xh = (double(y[i]) - mu) * inv;
    const double gn = xh * lw + lb;
    if (dg) dg[i] += S(d * (gn + st.u * vi));
    if (dv) dv[i] += S(d * gi * st.u);
    if (dr) dr[i] += S(st.du * ki * rk);
    if (dk) dk[i] += S(st.du * ri * rk);
    acc_rk += st.du * ri * ki;
    const double dgn = double(S(d * gi));
    if (dy) dy[i] += S(inv * (dgn * lw - st.m1 - xh * st.m2));
    acc_w += dgn * xh;
    acc_b += dgn;
  }
  if (part) {
    part[(0 * C + c) * n_tb + r.tb] = acc_rk;
    part[(1 * C + c) * n_tb + r.tb] = acc_w;
    part[(2 * C + c) * n_tb + r.tb] = acc_b;
  }
}

// ---- embedding backward -------------------------------------------------------------------------------

// Block (distinct id, channel block): each channel adds the id's rows in t order, as the CPU loop does (so
// the result is the CPU's to the bit). The sum is a serial chain per channel, so a frequent id is bound by
// load latency: the row indices are staged in shared memory and 32 row loads are in flight per add batch.
constexpr int kEmbThreads = 256;  // channels per block
constexpr int kEmbRows = 256;
constexpr int kEmbDepth = 32;
template <class S>
__global__ void __launch_bounds__(kEmbThreads)
    embedding_backward_kernel(const S* __restrict__ dout, const int32_t* __restrict__ order,
                              const int32_t* __restrict__ uniq, const int32_t* __restrict__ starts, S* dE, int64_t C) {
  __shared__ int32_t rows[kEmbRows];
  const int64_t u = blockIdx.x, c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t p0 = starts[u], p1 = starts[u + 1];
  S* out = dE + int64_t(uniq[u]) * C + c;
  S acc = c < C ? *out : S(0);
  const S* col = dout + c;
  if (p1 - p0 <= kEmbDepth) {  // most ids: a few rows, no staging
    if (c < C) {
#pragma unroll 8
      for (int64_t p = p0; p < p1; ++p) acc += col[int64_t(order[p]) * C];
      *out = acc;
    }
    return;
  }
  for (int64_t q0 = p0; q0 < p1; q0 += kEmbRows) {
    const int n = int(p1 - q0 < kEmbRows ? p1 - q0 : kEmbRows);
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) rows[i] = order[q0 + i];
    __syncthreads();
    if (c >= C) continue;
    int i = 0;
    for (; i + kEmbDepth <= n; i += kEmbDepth) {
      S v[kEmbDepth];
#pragma unroll
      for (int q = 0; q < kEmbDepth; ++q) v[q] = col[int64_t(rows[i + q]) * C];
#pragma unroll
      for (int q = 0; q < kEmbDepth; ++q) acc += v[q];
    }
    for (; i < n; ++i) acc += col[int64_t(rows[i]) * C];
  }
  if (c < C) *out = acc;
}

// ---- cross-entropy rows ---------------------------------------------------------------------------------

// Block-wide reductions in a fixed tree (warp shuffles, then warp 0 over the warps' results); every thread
// gets the result. `sh` holds at least 32 entries.
template <class T, class Op>
__device__ T block_reduce(T v, Op op, T* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    if (lane < n_warps) v = sh[lane];  // other lanes keep theirs: never combined below
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const T other = __shfl_down_sync(0xffffffffu, v, o);
      if (lane + o < n_warps) v = op(v, other);
    }
    if (lane == 0) sh[0] = v;
  }
  __syncthreads();
  const T r = sh[0];
  __syncthreads();
  return r;
}
struct MaxOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return b > a ? b : a;
  }
};
struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};

// The elements of a row in a fixed per-thread order: packs of kPack<S> when `vec`, else one at a time.
template <class S, class F>
__device__ __forceinline__ void for_row(const S* l, int64_t V, bool vec, F f) {
  int64_t done = 0;
  if (vec) {
    constexpr int K = kPack<S>;
    for (int64_t p = threadIdx.x; p < V / K; p += blockDim.x) {
      S x[K];
      load<K>(l + p * K, x);
#pragma unroll
      for (int j = 0; j < K; ++j) f(p * K + j, x[j]);
    }
    done = V / K * K;
  }
  for (int64_t i = done + threadIdx.x; i < V; i += blockDim.x) f(i, l[i]);
}

// exp(l - max): float as the CPU's fp32 path (difference and exponential in fp32), double in double.
__device__ __forceinline__ double exp_shifted(float l, float mx) { return double(expf(l - mx)); }
__device__ __forceinline__ double exp_shifted(double l, double mx) { return exp(l - mx); }

template <class S>
__global__ void __launch_bounds__(kRowThreads)
    cross_entropy_rows_kernel(const S* __restrict__ logits, const int32_t* __restrict__ targets, int64_t V, bool vec,
                              double* loss, double* lse, double* row_max) {
  __shared__ S sh_max[32];
  __shared__ double sh_sum[32];
  const int64_t t = blockIdx.x;
  const S* l = logits + t * V;
  S mx = S(-INFINITY);
  for_row(l, V, vec, [&](int64_t, S x) { mx = x > mx ? x : mx; });
  mx = block_reduce(mx, MaxOp{}, sh_max);
  double sum = 0;
  for_row(l, V, vec, [&](int64_t, S x) { sum += exp_shifted(x, mx); });
  sum = block_reduce(sum, SumOp{}, sh_sum);
  if (threadIdx.x == 0) {
    const double ls = double(mx) + log(sum);
    lse[t] = ls;
    loss[t] = targets[t] < 0 ? 0.0 : ls - double(l[targets[t]]);
    row_max[t] = double(mx);
  }
}

template <class S>
__global__ void __launch_bounds__(kRowThreads)
    cross_entropy_grad_rows_kernel(S* logits, const int32_t* __restrict__ targets, const double* __restrict__ lse,
                                   const double* __restrict__ coef, double l2_scale, int64_t l2_first, int64_t V,
                                   bool vec) {
  __shared__ S sh_val[32];
  __shared__ int64_t sh_idx[32];
  const int64_t t = blockIdx.x;
  S* l = logits + t * V;
  const bool l2 = l2_scale != 0 && t >= l2_first;
  S lm = S(0);
  int64_t am = -1;
  if (l2) {
    // The first maximal index: each thread keeps its first maximum (it visits indices in ascending order),
    // then the larger value wins and ties go to the smaller index.
    S bv = S(-INFINITY);
    int64_t bi = V;
    for_row<S>(l, V, vec, [&](int64_t i, S x) {
      if (x > bv || (x == bv && i < bi)) bv = x, bi = i;
    });
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    auto better = [](S v1, int64_t i1, S v2, int64_t i2) { return v2 > v1 || (v2 == v1 && i2 < i1); };
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const S ov = __shfl_down_sync(0xffffffffu, bv, o);
      const int64_t oi = __shfl_down_sync(0xffffffffu, bi, o);
      if (better(bv, bi, ov, oi)) bv = ov, bi = oi;
    }
    if (lane == 0) sh_val[warp] = bv, sh_idx[warp] = bi;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < n_warps; ++w)
        if (better(bv, bi, sh_val[w], sh_idx[w])) bv = sh_val[w], bi = sh_idx[w];
      sh_val[0] = bv, sh_idx[0] = bi;
    }
    __syncthreads();
    lm = sh_val[0];
    am = sh_idx[0] < V ? sh_idx[0] : 0;  // a row of -inf: the CPU's first element
  }
  __syncthreads();  // every read of the row is done before it is overwritten
  const int32_t target = targets[t];
  const bool active = target >= 0 && coef[t] != 0;
  if (!active) {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) l[i] = S(0);
  } else if constexpr (std::is_same_v<S, float>) {
    const float shift = float(lse[t]), c = float(coef[t]);
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) l[i] = expf(l[i] - shift) * c;
  } else {
    const double ls = lse[t], c = coef[t];
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) l[i] = c * exp(l[i] - ls);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (active) l[target] -= S(coef[t]);
    if (am >= 0) l[am] += S(double(lm) * l2_scale);
  }
}

// ---- sum of squares ------------------------------------------------------------------------------------

constexpr int kSumBlocks = 1024;

__global__ void __launch_bounds__(kThreads) sum_squares_partial_kernel(const float* __restrict__ g, int64_t n, bool vec,
                                                                       double* part) {
  __shared__ double sh[32];
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  double s = 0;
  int64_t done = 0;
  if (vec) {
    for (int64_t p = tid; p < n / 4; p += stride) {
      float x[4];
      load<4>(g + p * 4, x);
#pragma unroll
      for (int j = 0; j < 4; ++j) s += double(x[j]) * double(x[j]);
    }
    done = n / 4 * 4;
  }
  for (int64_t i = done + tid; i < n; i += stride) s += double(g[i]) * double(g[i]);
  s = block_reduce(s, SumOp{}, sh);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

__global__ void __launch_bounds__(kSumBlocks) sum_partials_kernel(const double* __restrict__ part, int n, double* out) {
  __shared__ double sh[32];
  double s = int(threadIdx.x) < n ? part[threadIdx.x] : 0.0;
  s = block_reduce(s, SumOp{}, sh);
  if (threadIdx.x == 0) *out = s;
}

}  // namespace

// ---- entry points --------------------------------------------------------------------------------------

template <class S>
void tanh_forward(cudaStream_t st, const S* x, S* y, int64_t n) {
  launch_map<S>(st, TanhFwd<S>{x, y}, n, all_aligned16(x, y));
}
template <class S>
void tanh_backward(cudaStream_t st, const S* dy, const S* y, S* dx, int64_t n) {
  launch_map<S>(st, GradAdd<S, Grad::tanh>{dy, y, dx}, n, all_aligned16(dy, y, dx));
}
template <class S>
void sigmoid_forward(cudaStream_t st, const S* x, S* y, int64_t n) {
  launch_map<S>(st, SigmoidFwd<S>{x, y}, n, all_aligned16(x, y));
}
template <class S>
void sigmoid_backward(cudaStream_t st, const S* dy, const S* y, S* dx, int64_t n) {
  launch_map<S>(st, GradAdd<S, Grad::sigmoid>{dy, y, dx}, n, all_aligned16(dy, y, dx));
}
template <class S>
void relu_square_forward(cudaStream_t st, const S* x, S* y, int64_t n) {
  launch_map<S>(st, ReluSquareFwd<S>{x, y}, n, all_aligned16(x, y));
}
template <class S>
void relu_square_backward(cudaStream_t st, const S* dy, const S* x, S* dx, int64_t n) {
  launch_map<S>(st, GradAdd<S, Grad::relu_square>{dy, x, dx}, n, all_aligned16(dy, x, dx));
}
template <class S>
void add_inplace(cudaStream_t st, S* y, const S* x, int64_t n) {
  launch_map<S>(st, GradAdd<S, Grad::add>{x, nullptr, y}, n, all_aligned16(x, y));
}

template <class S>
void token_shift_forward(cudaStream_t st, const S* x, S* delta, int64_t T, int64_t C) {
  launch_map<S>(st, TokenShiftFwd<S>{x, delta, C}, T * C, C % kPack<S> == 0 && all_aligned16(x, delta));
}
template <class S>
void token_shift_backward(cudaStream_t st, const S* ddelta, S* dx, int64_t T, int64_t C) {
  launch_map<S>(st, TokenShiftBwd<S>{ddelta, dx, C, T * C}, T * C, C % kPack<S> == 0 && all_aligned16(ddelta, dx));
}

template <class S>
void shift_mix_forward(cudaStream_t st, const S* x, const S* delta, const S* mu, S* out, int64_t T, int64_t C) {
  launch_map<S>(st, ShiftMixFwd<S>{x, delta, mu, out, C}, T * C,
                C % kPack<S> == 0 && all_aligned16(x, delta, mu, out));
}
template <class S>
void shift_mix_backward(cudaStream_t st, const S* dout, const S* delta, const S* mu, S* dx, S* ddelta, S* dmu,
                        int64_t T, int64_t C) {
  if (T <= 0 || C <= 0 || (!dx && !ddelta && !dmu)) return;
  const TokenBlocks tb = token_blocks(T);
  StreamScratch part(st, dmu ? size_t(C * tb.count) * sizeof(double) : 0);
  shift_mix_backward_kernel<S><<<column_grid(C, tb), kColThreads, 0, st>>>(dout, delta, mu, dx, ddelta,
                                                                           part.as<double>(), T, C, tb.size, tb.count);
  RWKVX_CUDA_LAUNCHED();
  if (dmu) {
    GradOut<S> out;
    out.p[0] = dmu;
    add_partials(st, part.as<double>(), tb, C, 1, out);
  }
}

template <class S>
void group_norm_forward(cudaStream_t st, const S* x, const S* w, const S* b, S* y, S* mean, S* rstd, int64_t T,
                        int64_t C, int64_t G, double eps) {
  const int64_t rows = T * (C / G);
  if (rows <= 0) return;
  with_row_lanes(G, [&](auto lanes) {
    constexpr int L = decltype(lanes)::value;
    group_norm_forward_kernel<S, L><<<row_blocks(rows, L), kThreads, 0, st>>>(x, w, b, y, mean, rstd, rows, C, G, eps);
    RWKVX_CUDA_LAUNCHED();
  });
}
template <class S>
void group_norm_backward(cudaStream_t st, const S* dy, const S* x, const S* w, const S* mean, const S* rstd, S* dx,
                         S* dw, S* db, int64_t T, int64_t C, int64_t G) {
  const int64_t rows = T * (C / G);
  if (rows <= 0 || (!dx && !dw && !db)) return;
  const TokenBlocks tb = token_blocks(T);
  StreamScratch stats(st, dx ? size_t(rows) * sizeof(double2) : 0);
  StreamScratch part(st, dw || db ? size_t(2 * C * tb.count) * sizeof(double) : 0);
  if (dx) {
    with_row_lanes(G, [&](auto lanes) {
      constexpr int L = decltype(lanes)::value;
      group_norm_stats_kernel<S, L><<<row_blocks(rows, L), kThreads, 0, st>>>(dy, x, w, mean, rstd,
                                                                             stats.as<double2>(), rows, C, G);
      RWKVX_CUDA_LAUNCHED();
    });
  }
  group_norm_backward_kernel<S><<<column_grid(C, tb), kColThreads, 0, st>>>(
      dy, x, w, mean, rstd, stats.as<double2>(), dx, part.as<double>(), T, C, G, tb.size, tb.count);
  RWKVX_CUDA_LAUNCHED();
  if (dw || db) {
    GradOut<S> out;
    out.p[0] = dw, out.p[1] = db;
    add_partials(st, part.as<double>(), tb, C, 2, out);
  }
}

template <class S>
void wkv_inputs_forward(cudaStream_t st, const S* wl, const S* al, const S* k, const S* w0, const S* a0, const S* k_k,
                        const S* k_a, S* w, S* a, S* alpha, S* beta, S* k_out, int64_t T, int64_t C, int64_t N) {
  const int64_t rows = T * (C / N);
  if (rows <= 0) return;
  with_row_lanes(N, [&](auto lanes) {
    constexpr int L = decltype(lanes)::value;
    wkv_inputs_forward_kernel<S, L><<<row_blocks(rows, L), kThreads, 0, st>>>(
        wl, al, k, w0, a0, k_k, k_a, w, a, alpha, beta, k_out, rows, C, N, decay_scale<S>());
    RWKVX_CUDA_LAUNCHED();
  });
}
template <class S>
void wkv_inputs_backward(cudaStream_t st, const S* dw, const S* dalpha, const S* dbeta, const S* dk_out, const S* wl,
                         const S* al, const S* k, const S* w0, const S* a0, const S* k_k, const S* k_a, S* dwl,
                         S* dal, S* dk, S* dw0, S* da0, S* dk_k, S* dk_a, int64_t T, int64_t C, int64_t N) {
  const int64_t rows = T * (C / N);
  const bool params = dw0 || da0 || dk_k || dk_a;
  if (rows <= 0 || (!dwl && !dal && !dk && !params)) return;
  const TokenBlocks tb = token_blocks(T);
  StreamScratch stats(st, size_t(rows) * sizeof(NormStats));
  StreamScratch part(st, params ? size_t(4 * C * tb.count) * sizeof(double) : 0);
  with_row_lanes(N, [&](auto lanes) {
    constexpr int L = decltype(lanes)::value;
    wkv_inputs_stats_kernel<S, L><<<row_blocks(rows, L), kThreads, 0, st>>>(dalpha, dbeta, al, k, a0, k_k,
                                                                           stats.as<NormStats>(), rows, C, N);
    RWKVX_CUDA_LAUNCHED();
  });
  wkv_inputs_backward_kernel<S><<<column_grid(C, tb), kColThreads, 0, st>>>(
      dw, dalpha, dbeta, dk_out, wl, al, k, w0, a0, k_k, k_a, stats.as<NormStats>(), dwl, dal, dk, part.as<double>(),
      T, C, N, decay_scale<S>(), tb.size, tb.count);
  RWKVX_CUDA_LAUNCHED();
  if (params) {
    GradOut<S> out;
    out.p[0] = dw0, out.p[1] = da0, out.p[2] = dk_k, out.p[3] = dk_a;
    add_partials(st, part.as<double>(), tb, C, 4, out);
  }
}

template <class S>
void value_residual_forward(cudaStream_t st, const S* v, const S* v_first, const S* vg, const S* v0, S* out, int64_t T,
                            int64_t C) {
  launch_map<S>(st, ValueResidualFwd<S>{v, v_first, vg, v0, out, C}, T * C,
                C % kPack<S> == 0 && all_aligned16(v, v_first, vg, v0, out));
}
template <class S>
void value_residual_backward(cudaStream_t st, const S* dout, const S* v, const S* v_first, const S* vg, const S* v0,
                             S* dv, S* dv_first, S* dvg, S* dv0, int64_t T, int64_t C) {
  if (T <= 0 || C <= 0 || (!dv && !dv_first && !dvg && !dv0)) return;
  const TokenBlocks tb = token_blocks(T);
  StreamScratch part(st, dv0 ? size_t(C * tb.count) * sizeof(double) : 0);
  value_residual_backward_kernel<S><<<column_grid(C, tb), kColThreads, 0, st>>>(
      dout, v, v_first, vg, v0, dv, dv_first, dvg, part.as<double>(), T, C, tb.size, tb.count);
  RWKVX_CUDA_LAUNCHED();
  if (dv0) {
    GradOut<S> out;
    out.p[0] = dv0;
    add_partials(st, part.as<double>(), tb, C, 1, out);
  }
}

template <class S>
void rwkv7_output_forward(cudaStream_t st, const S* y, const S* r, const S* k, const S* v, const S* r_k, const S* g,
                          const S* ln_w, const S* ln_b, double eps, S* out, S* mean, S* rstd, int64_t T, int64_t C,
                          int64_t N) {
  const int64_t rows = T * (C / N);
  if (rows <= 0) return;
  with_row_lanes(N, [&](auto lanes) {
    constexpr int L = decltype(lanes)::value;
    rwkv7_output_forward_kernel<S, L><<<row_blocks(rows, L), kThreads, 0, st>>>(y, r, k, v, r_k, g, ln_w, ln_b, eps,
                                                                               out, mean, rstd, rows, C, N);
    RWKVX_CUDA_LAUNCHED();
  });
}
template <class S>
void rwkv7_output_backward(cudaStream_t st, const S* dout, const S* y, const S* r, const S* k, const S* v,
                           const S* r_k, const S* g, const S* ln_w, const S* ln_b, const S* mean, const S* rstd, S* dy,
                           S* dr, S* dk, S* dv, S* dr_k, S* dg, S* dln_w, S* dln_b, int64_t T, int64_t C, int64_t N) {
  const int64_t rows = T * (C / N);
  const bool params = dr_k || dln_w || dln_b;
  if (rows <= 0 || (!dy && !dr && !dk && !dv && !dg && !params)) return;
  const TokenBlocks tb = token_blocks(T);
  StreamScratch stats(st, size_t(rows) * sizeof(OutputStats));
  StreamScratch part(st, params ? size_t(3 * C * tb.count) * sizeof(double) : 0);
  with_row_lanes(N, [&](auto lanes) {
    constexpr int L = decltype(lanes)::value;
    rwkv7_output_stats_kernel<S, L><<<row_blocks(rows, L), kThreads, 0, st>>>(dout, y, r, k, v, r_k, g, ln_w, mean,
                                                                             rstd, stats.as<OutputStats>(), rows, C, N);
    RWKVX_CUDA_LAUNCHED();
  });
  rwkv7_output_backward_kernel<S><<<column_grid(C, tb), kColThreads, 0, st>>>(
      dout, y, r, k, v, r_k, g, ln_w, ln_b, mean, rstd, stats.as<OutputStats>(), dy, dr, dk, dv, dg, part.as<double>(), T,
      C, N, tb.size, tb.count);
  RWKVX_CUDA_LAUNCHED();
  if (params) {
    GradOut<S> out;
    out.p[0] = dr_k, out.p[1] = dln_w, out.p[2] = dln_b;
    add_partials(st, part.as<double>(), tb, C, 3, out);
  }
}

template <class S>
void embedding_forward(cudaStream_t st, const S* E, const int32_t* ids, S* out, int64_t T, int64_t C) {
  launch_map<S>(st, EmbeddingFwd<S>{E, ids, out, C}, T * C, C % kPack<S> == 0 && all_aligned16(E, out));
}
template <class S>
void embedding_backward(cudaStream_t st, const S* dout, const int32_t* order, const int32_t* uniq,
                        const int32_t* starts, int64_t n_uniq, S* dE, int64_t C) {
  if (n_uniq <= 0 || C <= 0 || !dE) return;
  embedding_backward_kernel<S><<<dim3(unsigned(n_uniq), unsigned(ceil_div(C, kEmbThreads))), kEmbThreads, 0, st>>>(
      dout, order, uniq, starts, dE, C);
  RWKVX_CUDA_LAUNCHED();
}

template <class S>
void cross_entropy_rows(cudaStream_t st, const S* logits, const int32_t* targets, int64_t n, int64_t V, double* loss,
                        double* lse, double* row_max) {
  if (n <= 0) return;
  cross_entropy_rows_kernel<S><<<unsigned(n), kRowThreads, 0, st>>>(
      logits, targets, V, V % kPack<S> == 0 && aligned16(logits), loss, lse, row_max);
  RWKVX_CUDA_LAUNCHED();
}
template <class S>
void cross_entropy_grad_rows(cudaStream_t st, S* logits, const int32_t* targets, const double* lse, const double* coef,
                             double l2_scale, int64_t l2_first, int64_t n, int64_t V) {
  if (n <= 0) return;
  cross_entropy_grad_rows_kernel<S><<<unsigned(n), kRowThreads, 0, st>>>(
      logits, targets, lse, coef, l2_scale, l2_first, V, V % kPack<S> == 0 && aligned16(logits));
  RWKVX_CUDA_LAUNCHED();
}

void sum_squares(cudaStream_t st, const float* g, int64_t n, double* out) {
  // The number of blocks depends on n alone, so the sum's order does too.
  const int nb = n > 0 ? int(std::min<int64_t>(ceil_div(n, int64_t(kThreads) * 16), kSumBlocks)) : 0;
  StreamScratch part(st, size_t(std::max(nb, 1)) * sizeof(double));
  if (nb > 0) {
    sum_squares_partial_kernel<<<unsigned(nb), kThreads, 0, st>>>(g, n, aligned16(g), part.as<double>());
    RWKVX_CUDA_LAUNCHED();
  }
  sum_partials_kernel<<<1, kSumBlocks, 0, st>>>(part.as<double>(), nb, out);
  RWKVX_CUDA_LAUNCHED();
}
void scale_inplace(cudaStream_t st, float* g, int64_t n, double scale) {
  launch_map<float>(st, ScaleFwd{g, scale}, n, aligned16(g));
}
void adamw_update(cudaStream_t st, float* p, const float* g, float* m, float* v, int64_t n, double lr, double wd,
                  double beta1, double beta2, double eps, double bc1, double bc2_sqrt) {
  launch_map<float>(st, AdamWStep{p, g, m, v, lr, wd, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, bc1, bc2_sqrt}, n,
                    all_aligned16(p, g, m, v));
}

// ---- instantiations --------------------------------------------------------------------------------------

#define RWKVX_TRAIN_KERNELS(S)                                                                                     \
  template void tanh_forward<S>(cudaStream_t, const S*, S*, int64_t);                                              \
  template void tanh_backward<S>(cudaStream_t, const S*, const S*, S*, int64_t);                                   \
  template void sigmoid_forward<S>(cudaStream_t, const S*, S*, int64_t);                                           \
  template void sigmoid_backward<S>(cudaStream_t, const S*, const S*, S*, int64_t);                                \
  template void relu_square_forward<S>(cudaStream_t, const S*, S*, int64_t);                                       \
  template void relu_square_backward<S>(cudaStream_t, const S*, const S*, S*, int64_t);                            \
  template void add_inplace<S>(cudaStream_t, S*, const S*, int64_t);                                               \
  template void token_shift_forward<S>(cudaStream_t, const S*, S*, int64_t, int64_t);                              \
  template void token_shift_backward<S>(cudaStream_t, const S*, S*, int64_t, int64_t);                             \
  template void shift_mix_forward<S>(cudaStream_t, const S*, const S*, const S*, S*, int64_t, int64_t);            \
  template void shift_mix_backward<S>(cudaStream_t, const S*, const S*, const S*, S*, S*, S*, int64_t, int64_t);   \
  template void group_norm_forward<S>(cudaStream_t, const S*, const S*, const S*, S*, S*, S*, int64_t, int64_t,    \
                                      int64_t, double);                                                            \
  template void group_norm_backward<S>(cudaStream_t, const S*, const S*, const S*, const S*, const S*, S*, S*, S*, \
                                       int64_t, int64_t, int64_t);                                                 \
  template void wkv_inputs_forward<S>(cudaStream_t, const S*, const S*, const S*, const S*, const S*, const S*,    \
                                      const S*, S*, S*, S*, S*, S*, int64_t, int64_t, int64_t);                    \
  template void wkv_inputs_backward<S>(cudaStream_t, const S*, const S*, const S*, const S*, const S*, const S*,   \
                                       const S*, const S*, const S*, const S*, const S*, S*, S*, S*, S*, S*, S*,   \
                                       S*, int64_t, int64_t, int64_t);                                             \
  template void value_residual_forward<S>(cudaStream_t, const S*, const S*, const S*, const S*, S*, int64_t,       \
                                          int64_t);                                                                \
  template void value_residual_backward<S>(cudaStream_t, const S*, const S*, const S*, const S*, const S*, S*, S*, \
                                           S*, S*, int64_t, int64_t);                                              \
  template void rwkv7_output_forward<S>(cudaStream_t, const S*, const S*, const S*, const S*, const S*, const S*,  \
                                        const S*, const S*, double, S*, S*, S*, int64_t, int64_t, int64_t);        \
  template void rwkv7_output_backward<S>(cudaStream_t, const S*, const S*, const S*, const S*, const S*, const S*, \
                                         const S*, const S*, const S*, const S*, const S*, S*, S*, S*, S*, S*, S*, \
                                         S*, S*, int64_t, int64_t, int64_t);                                       \
  template void embedding_forward<S>(cudaStream_t, const S*, const int32_t*, S*, int64_t, int64_t);                \
  template void embedding_backward<S>(cudaStream_t, const S*, const int32_t*, const int32_t*, const int32_t*,      \
                                      int64_t, S*, int64_t);                                                       \
  template void cross_entropy_rows<S>(cudaStream_t, const S*, const int32_t*, int64_t, int64_t, double*, double*,  \
                                      double*);                                                                    \
  template void cross_entropy_grad_rows<S>(cudaStream_t, S*, const int32_t*, const double*, const double*, double, \
                                           int64_t, int64_t, int64_t);
RWKVX_TRAIN_KERNELS(float)
RWKVX_TRAIN_KERNELS(double)
#undef RWKVX_TRAIN_KERNELS

}  // namespace rwkvx::train::cuda
