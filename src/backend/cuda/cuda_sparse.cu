// CUDA kernels for the sparse-attention (MoBA) ops (spec model.md §5, §7.4): KV append with fp32 chunk means,
// exact top-k chunk attention, and the official eviction policy.
//
// sparse_attention runs in two steps:
//  1. gate: one warp per (query, head) scores every complete past chunk by q·mean in fp64 (as the reference
//     does, so the top-(k-1) choice and its ties, lower chunk first, agree with it) and writes the chosen chunks.
//  2. attention, one of two paths:
//     * prefill (≥ 32 queries, head_dim 64): the chosen (query, chunk) pairs are bucketed by chunk on the
//       device; one block per (chunk, head) attends its queries, 64 at a time, to the chunk's keys in 64×64
//       tiles with an online softmax and writes a partial result (normalised output + log-sum-exp) per pair.
//       Then one block per 64 queries and head runs the causal own-chunk part the same way and merges the
//       partials. Work is exactly the keys each query attends to, whatever the chunks' popularity.
//     * decode and other head sizes: each query's keys are split over several blocks (flash-decoding); in a
//       block 4 warps score 32 keys at a time (a key per lane) under an online softmax; a second kernel merges.
// K and V may be stored fp32 or bf16 (KvCache.dtype); every read widens to fp32, all arithmetic is fp32
// except the gate and the eviction votes (fp64).
#include <algorithm>
#include <cmath>
#include <numeric>

#include "backend/cuda/cuda_internal.h"

namespace rwkvx::cuda {
namespace {

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__global__ void store_rows_kernel(const float* src, int64_t n, T* dst) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = from_f32<T>(src[i]);
}

// Grid (chunks, ⌈C/256⌉): mean over each chunk's stored keys, fp64 sum.
template <typename T>
__global__ void chunk_mean_kernel(const T* k, int64_t C, int64_t chunk, int64_t n0, float* mean) {
  const int64_t n = n0 + blockIdx.x, c = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  double s = 0;
  for (int64_t r = n * chunk; r < (n + 1) * chunk; ++r) s += double(to_f32(k[r * C + c]));
  mean[n * C + c] = float(s / double(chunk));
}

// One warp per (query, head) of queries [tq0, tq0 + nq). scores: [nq·H][jmax] fp64 scratch.
__global__ void gate_kernel(const float* __restrict__ q, const float* __restrict__ mean, int64_t C, int D, int H,
                            int64_t first, int64_t tq0, int64_t nq, int64_t chunk, int Kp, int Kmax, int64_t jmax,
                            double* scores, int32_t* sel) {
  const int64_t wid = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (wid >= nq * H) return;
  const int64_t tl = tq0 + wid / H;
  const int h = int(wid % H);
  const int64_t t = first + tl, j = t / chunk;
  const int n_sel = int(min_i64(Kp, j));
  int32_t* out = sel + (tl * H + h) * Kmax;
  double* row = scores + wid * jmax;
  const float* qh = q + tl * C + int64_t(h) * D;
  for (int64_t n = lane; n < j; n += 32) {
    const float* m = mean + n * C + int64_t(h) * D;
    double s = 0;
    for (int d = 0; d < D; ++d) s += double(qh[d]) * double(m[d]);
    row[n] = s;
  }
  __syncwarp();
  for (int r = 0; r < n_sel; ++r) {
    int64_t best = -1;
    double bs = 0;
    for (int64_t n = lane; n < j; n += 32) {
      const double v = row[n];
      if (isnan(v)) continue;  // already chosen
      if (best < 0 || v > bs) best = n, bs = v;  // ascending n: ties keep the lower index
    }
    for (int o = 16; o > 0; o >>= 1) {
      const int64_t ob = __shfl_xor_sync(0xffffffffu, best, o);
      const double os = __shfl_xor_sync(0xffffffffu, bs, o);
      if (ob >= 0 && (best < 0 || os > bs || (os == bs && ob < best))) best = ob, bs = os;
    }
    if (lane == 0) {
      out[r] = int32_t(best);
      row[best] = nan("");
    }
    __syncwarp();
  }
  if (lane == 0) {
    for (int a = 1; a < n_sel; ++a)  // ascending chunk order
      for (int b = a; b > 0 && out[b - 1] > out[b]; --b) {
        const int32_t x = out[b];
        out[b] = out[b - 1], out[b - 1] = x;
      }
    for (int r = n_sel; r < Kmax; ++r) out[r] = -1;
  }
}

// ---- decode / generic head size --------------------------------------------------------------------------

// Split-key decode: grid (T·H, S); block (query·head, split) covers an S-th of the query's keys with 4 warps,
// each scoring 32 keys at once (one key per lane: independent loads in flight), then accumulating V rows
// (lanes over dims). Writes the unnormalised partial (m, l, acc[D]); attend_combine_kernel merges the splits.
// Shared: q [D], per-warp acc [4][D], m [4], l [4].
template <typename KT>
__global__ void attend_split_kernel(const float* __restrict__ q, const KT* __restrict__ K, const KT* __restrict__ V,
                                    const int32_t* __restrict__ sel, int64_t C, int D, int H, int64_t first,
                                    int64_t chunk, int Kmax, float scale, float* __restrict__ pm,
                                    float* __restrict__ pl, float* __restrict__ pacc) {
  extern __shared__ float sm[];
  float* qs = sm;
  float* acc = sm + D;
  float* ms = acc + 4 * D;
  float* ls = ms + 4;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, S = gridDim.y, split = blockIdx.y;
  const int64_t bt = blockIdx.x, tl = bt / H;
  const int h = int(bt % H);
  const int64_t t = first + tl, j = t / chunk, off = int64_t(h) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = q[tl * C + off + d];
  for (int d = lane; d < D; d += 32) acc[warp * D + d] = 0.f;
  __syncthreads();
  const int32_t* my = sel + bt * Kmax;
  int n_sel = 0;
  while (n_sel < Kmax && my[n_sel] >= 0) ++n_sel;
  const int64_t n_keys = int64_t(n_sel) * chunk + (t - j * chunk + 1);
  const int64_t per = (n_keys + S - 1) / S, k0 = split * per, k1 = min_i64(n_keys, k0 + per);
  float m = -INFINITY, l = 0.f;
  for (int64_t base = k0 + int64_t(warp) * 32; base < k1; base += 4 * 32) {
    const int64_t idx = base + lane;
    const bool valid = idx < k1;
    int64_t slot = 0;
    float sc = -INFINITY;
    if (valid) {
      slot = idx < int64_t(n_sel) * chunk ? int64_t(my[idx / chunk]) * chunk + idx % chunk
                                          : j * chunk + (idx - int64_t(n_sel) * chunk);
      const KT* kr = K + slot * C + off;
      float dot = 0.f;
      for (int d = 0; d < D; ++d) dot += qs[d] * to_f32(kr[d]);
      sc = dot * scale;
    }
    const float m_new = fmaxf(m, warp_max(sc));  // finite: lane 0 of every batch is valid
    const float corr = expf(m - m_new);
    const float p = valid ? expf(sc - m_new) : 0.f;
    l = l * corr + warp_sum(p);
    m = m_new;
    const int n_valid = int(min_i64(32, k1 - base));
    for (int d0 = 0; d0 < D; d0 += 32) {  // uniform trip count: every lane takes part in the shuffles
      const int d = d0 + lane;
      const bool on = d < D;
      float a = on ? acc[warp * D + d] * corr : 0.f;
      for (int i = 0; i < n_valid; ++i) {
        const float pi = __shfl_sync(0xffffffffu, p, i);
        const int64_t si = __shfl_sync(0xffffffffu, slot, i);
        if (on) a += pi * to_f32(V[si * C + off + d]);
      }
      if (on) acc[warp * D + d] = a;
    }
  }
  if (lane == 0) ms[warp] = m, ls[warp] = l;
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < 4; ++w) M = fmaxf(M, ms[w]);
  float L = 0.f, wt[4];
  for (int w = 0; w < 4; ++w) {
    wt[w] = ms[w] == -INFINITY ? 0.f : expf(ms[w] - M);
    L += ls[w] * wt[w];
  }
  const int64_t o = bt * S + split;
  if (threadIdx.x == 0) pm[o] = M, pl[o] = L;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.f;
    for (int w = 0; w < 4; ++w) a += acc[w * D + d] * wt[w];
    pacc[o * D + d] = a;
  }
}

// Block per (query, head): merges the S partials of attend_split_kernel into out.
__global__ void attend_combine_kernel(const float* pm, const float* pl, const float* pacc, int S, int64_t C, int D, int H,
                                      float* out) {
  const int64_t bt = blockIdx.x, tl = bt / H;
  const int h = int(bt % H);
  float M = -INFINITY;
  for (int s = 0; s < S; ++s) M = fmaxf(M, pm[bt * S + s]);
  float L = 0.f;
  for (int s = 0; s < S; ++s)
    if (pm[bt * S + s] != -INFINITY) L += pl[bt * S + s] * expf(pm[bt * S + s] - M);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.f;
    for (int s = 0; s < S; ++s)
      if (pm[bt * S + s] != -INFINITY) a += pacc[(bt * S + s) * D + d] * expf(pm[bt * S + s] - M);
    out[tl * C + int64_t(h) * D + d] = a / L;
  }
}

// ---- prefill, head_dim 64 --------------------------------------------------------------------------------

constexpr int kB = 64;  // queries and keys per tile; also the head dim of this path
constexpr int kLd = kB + 1;
constexpr size_t kTileSmem = sizeof(float) * (3 * kB * kLd + kB * kB);

__global__ void count_kernel(const int32_t* sel, int64_t n_entries, int H, int Kmax, int64_t nch, int* counts) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n_entries; e += int64_t(gridDim.x) * blockDim.x) {
    const int n = sel[e];
    if (n >= 0) atomicAdd(&counts[((e / Kmax) % H) * nch + n], 1);
  }
}

__global__ void scan_kernel(const int* counts, int64_t n, int* offsets) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int acc = 0;
  for (int64_t i = 0; i < n; ++i) offsets[i] = acc, acc += counts[i];
}

__global__ void scatter_kernel(const int32_t* sel, int64_t n_entries, int H, int Kmax, int64_t nch, const int* offsets,
                               int* cursor, int* list) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n_entries; e += int64_t(gridDim.x) * blockDim.x) {
    const int n = sel[e];
    if (n < 0) continue;
    const int64_t b = ((e / Kmax) % H) * nch + n;
    list[offsets[b] + atomicAdd(&cursor[b], 1)] = int(e);
  }
}

// Online-softmax state of 64 query rows × 64 dims over 256 threads: thread (ty, tx) owns rows ty·4 + a,
// score columns tx + 16·b and output dims tx + 16·e.
struct TileState {
  float m[4], l[4], acc[4][4];
};

// One 64-key tile starting at slot key0 (kn valid keys); valid(row, col) masks (query row, key col).
template <typename KT, typename Valid>
__device__ void attend_tile(const float* Qs, float* Ks, float* Vs, float* Ps, const KT* K, const KT* V, int64_t C,
                            int64_t off, int64_t key0, int kn, float scale, TileState& st, Valid valid) {
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  __syncthreads();
  for (int idx = tid; idx < kB * kB; idx += 256) {
    const int key = idx / kB, d = idx % kB;
    const bool in = key < kn;
    Ks[key * kLd + d] = in ? to_f32(K[(key0 + key) * C + off + d]) : 0.f;
    Vs[key * kB + d] = in ? to_f32(V[(key0 + key) * C + off + d]) : 0.f;
  }
  __syncthreads();
  float s[4][4] = {};
#pragma unroll 8
  for (int d = 0; d < kB; ++d) {
    float qa[4], kb[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) qa[a] = Qs[(ty * 4 + a) * kLd + d];
#pragma unroll
    for (int b = 0; b < 4; ++b) kb[b] = Ks[(tx + 16 * b) * kLd + d];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) s[a][b] += qa[a] * kb[b];
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int row = ty * 4 + a;
    float mx = -INFINITY;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      s[a][b] = valid(row, tx + 16 * b) ? s[a][b] * scale : -INFINITY;
      mx = fmaxf(mx, s[a][b]);
    }
    for (int o = 8; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float m_new = fmaxf(st.m[a], mx);
    float corr = 1.f, rs = 0.f, p[4];
    if (m_new == -INFINITY) {
#pragma unroll
      for (int b = 0; b < 4; ++b) p[b] = 0.f;
    } else {
      corr = expf(st.m[a] - m_new);
#pragma unroll
      for (int b = 0; b < 4; ++b) rs += (p[b] = expf(s[a][b] - m_new));
    }
    for (int o = 8; o > 0; o >>= 1) rs += __shfl_xor_sync(0xffffffffu, rs, o);
    st.l[a] = st.l[a] * corr + rs;
    st.m[a] = m_new;
#pragma unroll
    for (int e = 0; e < 4; ++e) st.acc[a][e] *= corr;
#pragma unroll
    for (int b = 0; b < 4; ++b) Ps[row * kLd + tx + 16 * b] = p[b];
  }
  __syncthreads();
#pragma unroll 8
  for (int key = 0; key < kB; ++key) {
    float pv[4], vv[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) pv[a] = Ps[(ty * 4 + a) * kLd + key];
#pragma unroll
    for (int e = 0; e < 4; ++e) vv[e] = Vs[key * kB + tx + 16 * e];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int e = 0; e < 4; ++e) st.acc[a][e] += pv[a] * vv[e];
  }
}

__device__ void init_state(TileState& st) {
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    st.m[a] = -INFINITY, st.l[a] = 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) st.acc[a][e] = 0.f;
  }
}

// Grid (chunks, H, groups): block (n, h, z) attends groups z, z + groups, … of 64 queries that chose chunk n
// for head h.
template <typename KT>
__global__ void __launch_bounds__(256) chunk_attend_kernel(const float* __restrict__ q, const KT* __restrict__ K,
                                                           const KT* __restrict__ V, const int* counts, const int* offsets,
                                                           const int* list, int64_t C, int H, int64_t nch,
                                                           int64_t chunk, int Kmax, float scale, float* pacc,
                                                           float* plse) {
  extern __shared__ float sm[];
  float *Qs = sm, *Ks = Qs + kB * kLd, *Vs = Ks + kB * kLd, *Ps = Vs + kB * kB;
  __shared__ int entries[kB];
  const int64_t n = blockIdx.x;
  const int h = blockIdx.y, tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int cnt = counts[h * nch + n], base = offsets[h * nch + n];
  const int64_t off = int64_t(h) * kB;
  // blockIdx.z picks every gridDim.z-th group of 64 queries (most blocks of a lightly chosen chunk exit here).
  for (int g0 = int(blockIdx.z) * kB; g0 < cnt; g0 += int(gridDim.z) * kB) {
    const int rows = min(kB, cnt - g0);
    __syncthreads();  // the previous group is done with Qs and entries
    if (tid < kB) entries[tid] = tid < rows ? list[base + g0 + tid] : -1;
    __syncthreads();
    for (int idx = tid; idx < kB * kB; idx += 256) {
      const int r = idx / kB, d = idx % kB;
      const int e = entries[r];
      Qs[r * kLd + d] = e >= 0 ? q[int64_t(e / (H * Kmax)) * C + off + d] : 0.f;
    }
    TileState st;
    init_state(st);
    for (int64_t key0 = n * chunk; key0 < (n + 1) * chunk; key0 += kB) {
      const int kn = int(min_i64(kB, (n + 1) * chunk - key0));
      attend_tile(Qs, Ks, Vs, Ps, K, V, C, off, key0, kn, scale, st, [&](int row, int col) { return col < kn; });
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int r = ty * 4 + a;
      if (r >= rows) continue;
      const int64_t e = entries[r];
      const float inv = 1.f / st.l[a];
#pragma unroll
      for (int x = 0; x < 4; ++x) pacc[e * kB + tx + 16 * x] = st.acc[a][x] * inv;
      if (tx == 0) plse[e] = st.m[a] + logf(st.l[a]);
    }
  }
}

// Grid (⌈T/64⌉, H): causal own-chunk attention for 64 queries, merged with their chosen chunks' partials.
template <typename KT>
__global__ void __launch_bounds__(256) own_attend_kernel(const float* __restrict__ q, const KT* __restrict__ K,
                                                         const KT* __restrict__ V, const int32_t* __restrict__ sel,
                                                         const float* __restrict__ pacc, const float* __restrict__ plse,
                                                         int64_t C, int H, int64_t T, int64_t first, int64_t chunk,
                                                         int Kmax, float scale, float* __restrict__ out) {
  extern __shared__ float sm[];
  float *Qs = sm, *Ks = Qs + kB * kLd, *Vs = Ks + kB * kLd, *Ps = Vs + kB * kB;
  const int h = blockIdx.y, tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t q0 = int64_t(blockIdx.x) * kB, off = int64_t(h) * kB;
  const int rows = int(min_i64(kB, T - q0));
  for (int idx = tid; idx < kB * kB; idx += 256) {
    const int r = idx / kB, d = idx % kB;
    Qs[r * kLd + d] = r < rows ? q[(q0 + r) * C + off + d] : 0.f;
  }
  const int64_t t_first = first + q0, t_last = t_first + rows - 1;
  TileState st;
  init_state(st);
  for (int64_t key0 = t_first / chunk * chunk; key0 <= t_last; key0 += kB) {
    const int kn = int(min_i64(kB, t_last - key0 + 1));
    attend_tile(Qs, Ks, Vs, Ps, K, V, C, off, key0, kn, scale, st, [&](int row, int col) {
      const int64_t t = t_first + row, s = key0 + col;
      return row < rows && col < kn && s <= t && s >= t / chunk * chunk;
    });
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int r = ty * 4 + a;
    if (r >= rows) continue;
    const int64_t tl = q0 + r;
    float M = st.m[a] + logf(st.l[a]);
    const float own_lse = M;
    for (int i = 0; i < Kmax; ++i) {
      const int64_t e = (tl * H + h) * Kmax + i;
      if (sel[e] >= 0) M = fmaxf(M, plse[e]);
    }
    const float w_own = expf(own_lse - M) / st.l[a];
    float res[4], wsum = expf(own_lse - M);
#pragma unroll
    for (int x = 0; x < 4; ++x) res[x] = st.acc[a][x] * w_own;
    for (int i = 0; i < Kmax; ++i) {
      const int64_t e = (tl * H + h) * Kmax + i;
      if (sel[e] < 0) continue;
      const float w = expf(plse[e] - M);
      wsum += w;
#pragma unroll
      for (int x = 0; x < 4; ++x) res[x] += w * pacc[e * kB + tx + 16 * x];
    }
#pragma unroll
    for (int x = 0; x < 4; ++x) out[tl * C + off + tx + 16 * x] = res[x] / wsum;
  }
}

// ---- eviction ---------------------------------------------------------------------------------------------

__device__ double block_max_d(double v) {
  __shared__ double part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  double s = lane < n_warps ? part[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) s = fmax(s, __shfl_xor_sync(0xffffffffu, s, o));
  return s;
}

template <typename KT>
__device__ double dot_d(const float* qh, const KT* kr, int D) {
  double s = 0;
  for (int d = 0; d < D; ++d) s += double(qh[d]) * double(to_f32(kr[d]));
  return s;
}

// Block per (query, head): softmax max and denominator over the `past` oldest slots, fp64.
template <typename KT>
__global__ void evict_stats_kernel(const float* q, const KT* K, int64_t C, int D, int H, int64_t past, double scale,
                                   double* mx, double* den) {
  const int64_t t = blockIdx.x / H;
  const int h = int(blockIdx.x % H);
  const float* qh = q + t * C + int64_t(h) * D;
  double m = -INFINITY;
  for (int64_t s = threadIdx.x; s < past; s += blockDim.x) m = fmax(m, dot_d(qh, K + s * C + int64_t(h) * D, D) * scale);
  m = block_max_d(m);
  double z = 0;
  for (int64_t s = threadIdx.x; s < past; s += blockDim.x) z += exp(dot_d(qh, K + s * C + int64_t(h) * D, D) * scale - m);
  z = block_sum(z);
  if (threadIdx.x == 0) mx[blockIdx.x] = m, den[blockIdx.x] = z;
}

// Thread per (head, slot): Σ over queries in order of softmax weight, fp64.
template <typename KT>
__global__ void evict_votes_kernel(const float* q, const KT* K, int64_t C, int D, int H, int64_t T, int64_t past,
                                   double scale, const double* mx, const double* den, double* votes) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= int64_t(H) * past) return;
  const int h = int(i / past);
  const int64_t s = i % past;
  double v = 0;
  for (int64_t t = 0; t < T; ++t) {
    const double l = dot_d(q + t * C + int64_t(h) * D, K + s * C + int64_t(h) * D, D) * scale;
    v += exp(l - mx[t * H + h]) / den[t * H + h];
  }
  votes[i] = v;
}

template <typename KT>
__global__ void evict_gather_kernel(const KT* K, const KT* V, int64_t C, int D, int64_t keep, int64_t rows, int64_t past,
                                    const int32_t* order, KT* nk, KT* nv) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * C; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / C, c = i % C, h = c / D;
    const int64_t src = r < keep ? int64_t(order[h * keep + r]) : past + (r - keep);
    nk[i] = K[src * C + c];
    nv[i] = V[src * C + c];
  }
}

template <typename KT>
const KT* ptr(const Tensor& t) {
  return static_cast<const KT*>(t.data);
}
template <typename KT>
KT* mptr(Tensor& t) {
  return static_cast<KT*>(t.data);
}

// Calls f.template operator()<KT>() with KT the cache's storage type.
template <typename F>
void with_kv_type(DType dt, F&& f) {
  if (dt == DType::bf16) f.template operator()<__nv_bfloat16>();
  else f.template operator()<float>();
}

}  // namespace

namespace {

void update_means(CudaBackend& be, KvCache& c, int64_t from) {
  const int64_t C = c.k.row_size();
  const int64_t n_chunks = c.len / c.chunk;
  if (n_chunks > from) {
    with_kv_type(c.k.dtype, [&]<typename KT>() {
      chunk_mean_kernel<KT><<<dim3(unsigned(n_chunks - from), unsigned((C + 255) / 256)), 256, 0, be.stream()>>>(
          ptr<KT>(c.k), C, c.chunk, from, mptr<float>(c.chunk_mean));
    });
    RWKVX_CUDA_LAUNCHED();
  }
  c.n_chunks = n_chunks;
}

}  // namespace

void CudaBackend::kv_append(KvCache& cache, const Tensor& k, const Tensor& v, int chunk) {
  OpTimer timer_(this, "kv_append");
  const int64_t T = k.rows(), C = k.row_size();
  RWKVX_ASSERT(chunk > 0 && (cache.len == 0 || cache.chunk == chunk), "kv_append: chunk size changed");
  RWKVX_ASSERT(cache.dtype == DType::f32 || cache.dtype == DType::bf16, "kv_append: KV dtype must be f32 or bf16");
  if (!cache.k.empty()) cache.dtype = cache.k.dtype;
  cache.chunk = chunk;
  const int64_t need = cache.len + T;
  const int64_t cap = cache.k.empty() ? 0 : cache.k.rows();
  if (need > cap) {
    int64_t new_cap = std::max<int64_t>(need, 2 * cap);
    new_cap = (new_cap + chunk - 1) / chunk * chunk;
    Tensor nk = alloc(cache.dtype, {new_cap, C}), nv = alloc(cache.dtype, {new_cap, C});
    Tensor nm = alloc(DType::f32, {new_cap / chunk, C});
    if (cache.len > 0) {
      const size_t row = size_t(C) * dtype_size(cache.dtype);
      RWKVX_CUDA_CHECK(cudaMemcpyAsync(nk.data, cache.k.data, size_t(cache.len) * row, cudaMemcpyDeviceToDevice, stream()));
      RWKVX_CUDA_CHECK(cudaMemcpyAsync(nv.data, cache.v.data, size_t(cache.len) * row, cudaMemcpyDeviceToDevice, stream()));
      RWKVX_CUDA_CHECK(cudaMemcpyAsync(nm.data, cache.chunk_mean.data, size_t(cache.n_chunks * C) * 4,
                                       cudaMemcpyDeviceToDevice, stream()));
    }
    cache.k = nk, cache.v = nv, cache.chunk_mean = nm;
  }
  if (T > 0) {
    with_kv_type(cache.dtype, [&]<typename KT>() {
      const unsigned g = std::min<unsigned>(grid_for(T * C, 256), 65536u);
      store_rows_kernel<KT><<<g, 256, 0, stream()>>>(ptr<float>(k), T * C, mptr<KT>(cache.k) + cache.len * C);
      store_rows_kernel<KT><<<g, 256, 0, stream()>>>(ptr<float>(v), T * C, mptr<KT>(cache.v) + cache.len * C);
    });
    RWKVX_CUDA_LAUNCHED();
  }
  cache.len = need;
  update_means(*this, cache, cache.n_chunks);
}

void CudaBackend::sparse_attention(const Tensor& q, const KvCache& cache, const SparseAttnParams& p, Tensor& out) {
  OpTimer timer_(this, "sparse_attention");
  const int64_t T = q.rows(), C = q.row_size(), D = p.head_dim, H = C / D, c = cache.chunk;
  const int64_t first = cache.len - T;
  RWKVX_ASSERT(first >= 0 && C % D == 0, "sparse_attention: queries exceed the cache");
  RWKVX_ASSERT(cache.len == 0 || (cache.len - 1) / c <= cache.n_chunks, "sparse_attention: chunk means missing");
  if (T == 0) return;
  const float scale = 1.0f / std::sqrt(float(D));
  const int Kp = std::max(0, p.top_k - 1);
  const int64_t jmax = (cache.len - 1) / c;  // own chunk of the last query = most past chunks any query sees
  const int Kmax = int(std::min<int64_t>(Kp, jmax));

  // 1. Gate.
  Tensor sel_t = scratch(size_t(std::max<int64_t>(1, T * H * Kmax)) * 4);
  auto* sel = static_cast<int32_t*>(sel_t.data);
  if (Kmax > 0) {
    OpTimer gate_timer(this, "sparse_attention.gate");
    const int64_t per_query = H * jmax * 8;
    const int64_t batch = std::max<int64_t>(1, std::min<int64_t>(T, (int64_t(64) << 20) / per_query));
    Tensor scores = scratch(size_t(batch * per_query));
    for (int64_t t0 = 0; t0 < T; t0 += batch) {
      const int64_t nq = std::min(batch, T - t0);
      gate_kernel<<<grid_for(nq * H * 32, 256), 256, 0, stream()>>>(
          ptr<float>(q), ptr<float>(cache.chunk_mean), C, int(D), int(H), first, t0, nq, c, Kp, Kmax, jmax,
          static_cast<double*>(scores.data), sel);
      RWKVX_CUDA_LAUNCHED();
    }
  }

  // 2. Attention.
  if (D == kB && T >= 32) {
    Tensor pacc, plse;
    if (Kmax > 0) {
      OpTimer chunk_timer(this, "sparse_attention.chunks");
      const int64_t n_entries = T * H * Kmax, nb = H * jmax;
      Tensor meta = alloc(DType::f32, {3 * nb});  // counts, cursor (zeroed), offsets
      int* counts = static_cast<int*>(meta.data);
      int* cursor = counts + nb;
      int* offsets = cursor + nb;
      Tensor list = scratch(size_t(n_entries) * 4);
      pacc = scratch(size_t(n_entries * kB) * 4);
      plse = scratch(size_t(n_entries) * 4);
      const unsigned g = std::min<unsigned>(grid_for(n_entries, 256), 65536u);
      count_kernel<<<g, 256, 0, stream()>>>(sel, n_entries, int(H), Kmax, jmax, counts);
      scan_kernel<<<1, 32, 0, stream()>>>(counts, nb, offsets);
      scatter_kernel<<<g, 256, 0, stream()>>>(sel, n_entries, int(H), Kmax, jmax, offsets, cursor,
                                              static_cast<int*>(list.data));
      RWKVX_CUDA_LAUNCHED();
      with_kv_type(cache.k.dtype, [&]<typename KT>() {
        RWKVX_CUDA_CHECK(cudaFuncSetAttribute(chunk_attend_kernel<KT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              int(kTileSmem)));
        const unsigned groups = unsigned(std::min<int64_t>((T + kB - 1) / kB, 1024));
        chunk_attend_kernel<KT><<<dim3(unsigned(jmax), unsigned(H), groups), 256, kTileSmem, stream()>>>(
            ptr<float>(q), ptr<KT>(cache.k), ptr<KT>(cache.v), counts, offsets, static_cast<const int*>(list.data), C,
            int(H), jmax, c, Kmax, scale, mptr<float>(pacc), mptr<float>(plse));
      });
      RWKVX_CUDA_LAUNCHED();
    }
    with_kv_type(cache.k.dtype, [&]<typename KT>() {
      RWKVX_CUDA_CHECK(cudaFuncSetAttribute(own_attend_kernel<KT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            int(kTileSmem)));
      own_attend_kernel<KT><<<dim3(unsigned((T + kB - 1) / kB), unsigned(H)), 256, kTileSmem, stream()>>>(
          ptr<float>(q), ptr<KT>(cache.k), ptr<KT>(cache.v), sel, Kmax ? ptr<float>(pacc) : nullptr,
          Kmax ? ptr<float>(plse) : nullptr, C, int(H), T, first, c, Kmax, scale, mptr<float>(out));
    });
    RWKVX_CUDA_LAUNCHED();
    return;
  }
  // Decode / other head sizes: split each query's keys over S blocks (≈ 512 keys each, enough blocks to
  // fill the GPU when few queries are in flight), then merge.
  const int64_t max_keys = int64_t(Kmax) * c + c;
  int64_t S = std::min<int64_t>((max_keys + 511) / 512, std::max<int64_t>(1, 4 * sm_count() / (T * H)));
  S = std::max<int64_t>(1, std::min<int64_t>(S, 64));
  Tensor part = scratch(size_t(T * H * S * (D + 2)) * 4);
  float* pm = mptr<float>(part);
  float* pl = pm + T * H * S;
  float* pa = pl + T * H * S;
  with_kv_type(cache.k.dtype, [&]<typename KT>() {
    const size_t smem = sizeof(float) * size_t(5 * D + 8);
    if (smem > 48 * 1024)
      RWKVX_CUDA_CHECK(cudaFuncSetAttribute(attend_split_kernel<KT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            int(smem)));
    attend_split_kernel<KT><<<dim3(unsigned(T * H), unsigned(S)), 128, smem, stream()>>>(
        ptr<float>(q), ptr<KT>(cache.k), ptr<KT>(cache.v), sel, C, int(D), int(H), first, c, Kmax, scale, pm, pl, pa);
  });
  RWKVX_CUDA_LAUNCHED();
  attend_combine_kernel<<<unsigned(T * H), 64, 0, stream()>>>(pm, pl, pa, int(S), C, int(D), int(H), mptr<float>(out));
  RWKVX_CUDA_LAUNCHED();
}

void CudaBackend::kv_evict(KvCache& cache, const Tensor& q, const KvEvictionParams& e, const SparseAttnParams& p) {
  OpTimer timer_(this, "kv_evict");
  const int64_t L = cache.len;
  if (e.max_len <= 0 || L <= e.max_len || L <= e.min_len || L <= e.window) return;
  const int64_t C = cache.k.row_size(), D = p.head_dim, H = C / D, T = q.rows();
  const int64_t past = L - e.window, keep = std::min(e.min_len - e.window, past);
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<double> votes(size_t(H * past));
  Tensor stats = scratch(size_t(std::max<int64_t>(1, T * H)) * 16), dvotes = scratch(votes.size() * 8);
  auto* mx = static_cast<double*>(stats.data);
  double* den = mx + T * H;
  with_kv_type(cache.k.dtype, [&]<typename KT>() {
    if (T > 0) {
      evict_stats_kernel<KT><<<unsigned(T * H), 256, 0, stream()>>>(ptr<float>(q), ptr<KT>(cache.k), C, int(D), int(H),
                                                                    past, scale, mx, den);
      RWKVX_CUDA_LAUNCHED();
    }
    evict_votes_kernel<KT><<<grid_for(H * past, 128), 128, 0, stream()>>>(ptr<float>(q), ptr<KT>(cache.k), C, int(D),
                                                                          int(H), T, past, scale, mx, den,
                                                                          static_cast<double*>(dvotes.data));
    RWKVX_CUDA_LAUNCHED();
  });
  RWKVX_CUDA_CHECK(cudaMemcpyAsync(votes.data(), dvotes.data, votes.size() * 8, cudaMemcpyDeviceToHost, stream()));
  synchronize();
  // Per head: the `keep` older rows with the most votes, in descending-vote order (stable: older first on ties).
  std::vector<int32_t> order(size_t(std::max<int64_t>(1, H * keep)));
  std::vector<int64_t> idx(static_cast<size_t>(past));
  for (int64_t h = 0; h < H; ++h) {
    const double* vh = votes.data() + h * past;
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return vh[a] > vh[b]; });
    for (int64_t r = 0; r < keep; ++r) order[size_t(h * keep + r)] = int32_t(idx[size_t(r)]);
  }
  Tensor d_order = scratch(order.size() * 4);
  RWKVX_CUDA_CHECK(cudaMemcpyAsync(d_order.data, order.data(), order.size() * 4, cudaMemcpyHostToDevice, stream()));
  synchronize();  // `order` dies with this scope
  const int64_t rows = keep + e.window;
  Tensor nk = alloc(cache.k.dtype, {cache.k.rows(), C}), nv = alloc(cache.k.dtype, {cache.k.rows(), C});
  with_kv_type(cache.k.dtype, [&]<typename KT>() {
    evict_gather_kernel<KT><<<std::min<unsigned>(grid_for(rows * C, 256), 65536u), 256, 0, stream()>>>(
        ptr<KT>(cache.k), ptr<KT>(cache.v), C, int(D), keep, rows, past, static_cast<const int32_t*>(d_order.data),
        mptr<KT>(nk), mptr<KT>(nv));
  });
  RWKVX_CUDA_LAUNCHED();
  cache.k = nk;
  cache.v = nv;
  cache.len = rows;
  update_means(*this, cache, 0);
}

}  // namespace rwkvx::cuda
