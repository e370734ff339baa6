// CUDA kernels for the sparse-attention (MoBA) ops (spec model.md §5, §7.4): KV append with fp32 chunk means,
// exact top-k chunk attention, and the official eviction policy.
//
// sparse_attention runs in two steps:
//  1. gate: a thread per (query, head) scores every complete past chunk by q·mean in fp64 (as the reference
//     does, so the top-(k-1) choice and its ties, lower chunk first, agree with it), from shared tiles of the
//     chunk means, and writes the chosen chunks.
//  2. attention, one of two paths:
//     * prefill (≥ 32 queries, head_dim 64), on bf16 tensor cores (mma.sync m16n8k16, fp32 accumulators,
//       flash-style online softmax in fp32): the chosen (query, chunk) pairs are bucketed by (head, chunk) on
//       the device; a block of 4 warps per 64 pairs of a bucket (128 with single bf16: two 16-row m-tiles per
//       warp) attends them to the chunk's keys in 64-key tiles (copied asynchronously, 3 stages) and writes a
//       partial result (normalised output + log-sum-exp) per pair. Then a block per 64 (128) queries and head
//       runs the causal own-chunk part the same way and merges the partials. Work is exactly the keys each
//       query attends to, whatever the chunks' popularity.
//       Precision: by default every fp32 operand (Q, P, and fp32 K/V) is split into bf16 hi + lo and each
//       product takes three tensor-core terms (~16 significant bits); with single_bf16_activations or
//       single_bf16_attention each operand is rounded once to bf16. fp32 caches are rounded (split) to bf16
//       once per call, for the rows the tiles read.
//     * decode and other head sizes: each query's keys are split over several blocks (flash-decoding); in a
//       block 4 warps score 32 keys at a time (a key per lane) under an online softmax; a second kernel
//       merges. All fp32.
// K and V may be stored fp32 or bf16 (KvCache.dtype). The gate and the eviction votes are fp64.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/tensor_core.cuh"

namespace rwkvx::cuda {
namespace {

using namespace rwkvx::tensor_core;

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

constexpr int kGateThreads = 128;
constexpr int kGateRows = 2;        // queries per thread: each shared mean read feeds two products
constexpr int kGateQueries = kGateThreads * kGateRows;  // per block
constexpr int kGateChunks = 16;     // chunk means per shared tile
constexpr int kGateDims = 16;       // query dims held in registers at a time
constexpr int kGateSharedKeep = 8;  // top lists of up to this many chunks live in shared memory

// Dynamic shared memory of gate_kernel: the mean tile, then (Kmax ≤ kGateSharedKeep) the lists.
inline size_t gate_smem(int Dp, int Kmax) {
  return size_t(kGateChunks) * Dp * 8 + (Kmax <= kGateSharedKeep ? size_t(kGateQueries) * Kmax * 12 : 0);
}

// Grid (⌈nq/256⌉, H): thread r scores queries tq0 + 256·x + r + 128·i (i < 2) of head y against each of their
// candidate chunks in fp64, 16 chunks at a time, from a shared fp64 copy of their means (dims zero-padded to a
// multiple of 16: adding +0 changes no sum). Products of fp32 values are exact in fp64 and every score sums
// over d in order, as the reference does. Each query's top-(k−1) list stays sorted by score descending, lower
// chunk first on ties (a later chunk must beat, not equal, the last entry): in shared memory when Kmax ≤ 8
// (insertions then cost no device-memory round trips), else in best (scores, [nq·H][Kmax] scratch) and sel.
// At the end sel gets the chosen chunks in ascending order, −1 after them.
__global__ void __launch_bounds__(kGateThreads) gate_kernel(const float* __restrict__ q, const float* __restrict__ mean,
                                                            int64_t C, int D, int H, int64_t first, int64_t tq0,
                                                            int64_t nq, int64_t chunk, int Kp, int Kmax,
                                                            double* __restrict__ best, int32_t* __restrict__ sel) {
  extern __shared__ double means[];  // [kGateChunks][Dp], then the lists' scores and chunks when shared
  const int Dp = (D + kGateDims - 1) / kGateDims * kGateDims;
  const bool shared_lists = Kmax <= kGateSharedKeep;
  double* list_scores = means + kGateChunks * Dp;
  auto* list_chunks = reinterpret_cast<int32_t*>(list_scores + kGateQueries * Kmax);
  const int h = blockIdx.y;
  const int64_t row0 = tq0 + int64_t(blockIdx.x) * kGateQueries;  // local query index of the block's first row
  const int rows = int(min_i64(kGateQueries, tq0 + nq - row0));
  const int64_t j_block = (first + row0 + rows - 1) / chunk;
  int64_t j[kGateRows];  // candidates of row i: chunks [0, j[i])
  int n_sel[kGateRows], cnt[kGateRows];
  double worst[kGateRows];
  int32_t* out[kGateRows];  // the row's sel entries
  int32_t* lst[kGateRows];  // its list's chunks (out itself when not shared)
  double* bs[kGateRows];    // its list's scores
  const float* qr[kGateRows];
#pragma unroll
  for (int i = 0; i < kGateRows; ++i) {
    const int r = int(threadIdx.x) + i * kGateThreads;
    const int64_t tl = row0 + r;
    j[i] = r < rows ? (first + tl) / chunk : 0;
    n_sel[i] = int(min_i64(Kp, j[i]));
    cnt[i] = 0, worst[i] = 0;
    out[i] = sel + (tl * H + h) * Kmax;
    lst[i] = shared_lists ? list_chunks + r * Kmax : out[i];
    bs[i] = shared_lists ? list_scores + r * Kmax : best + ((tl - tq0) * H + h) * Kmax;
    qr[i] = q + (r < rows ? tl : row0) * C + int64_t(h) * D;
  }
  for (int64_t n0 = 0; n0 < j_block; n0 += kGateChunks) {
    const int nt = int(min_i64(kGateChunks, j_block - n0));
    __syncthreads();  // the previous tile is consumed
    for (int i = threadIdx.x; i < kGateChunks * Dp; i += blockDim.x) {
      const int cc = i / Dp, d = i % Dp;
      means[i] = cc < nt && d < D ? double(mean[(n0 + cc) * C + int64_t(h) * D + d]) : 0.0;
    }
    __syncthreads();
    bool needed = false;
#pragma unroll
    for (int i = 0; i < kGateRows; ++i) needed |= n0 < j[i];
    if (!needed) continue;
    double sc[kGateRows][kGateChunks];
#pragma unroll
    for (int i = 0; i < kGateRows; ++i)
#pragma unroll
      for (int cc = 0; cc < kGateChunks; ++cc) sc[i][cc] = 0.0;
    for (int d0 = 0; d0 < Dp; d0 += kGateDims) {
      double qd[kGateRows][kGateDims];
#pragma unroll
      for (int i = 0; i < kGateRows; ++i)
#pragma unroll
        for (int dd = 0; dd < kGateDims; ++dd) qd[i][dd] = d0 + dd < D ? double(qr[i][d0 + dd]) : 0.0;
#pragma unroll
      for (int cc = 0; cc < kGateChunks; ++cc)
#pragma unroll
        for (int dd = 0; dd < kGateDims; dd += 2) {
          const double2 m = *reinterpret_cast<const double2*>(means + cc * Dp + d0 + dd);
#pragma unroll
          for (int i = 0; i < kGateRows; ++i) {
            sc[i][cc] += qd[i][dd] * m.x;
            sc[i][cc] += qd[i][dd + 1] * m.y;
          }
        }
    }
#pragma unroll
    for (int i = 0; i < kGateRows; ++i)
#pragma unroll
      for (int cc = 0; cc < kGateChunks; ++cc) {
        const int64_t n = n0 + cc;
        const double v = sc[i][cc];
        if (n >= j[i] || isnan(v)) continue;
        int pos;
        if (cnt[i] < n_sel[i]) pos = cnt[i]++;
        else if (v > worst[i]) pos = n_sel[i] - 1;
        else continue;
        for (; pos > 0 && bs[i][pos - 1] < v; --pos) bs[i][pos] = bs[i][pos - 1], lst[i][pos] = lst[i][pos - 1];
        bs[i][pos] = v, lst[i][pos] = int32_t(n);
        if (cnt[i] == n_sel[i]) worst[i] = bs[i][n_sel[i] - 1];
      }
  }
#pragma unroll
  for (int i = 0; i < kGateRows; ++i) {
    if (int(threadIdx.x) + i * kGateThreads >= rows) continue;
    for (int a = 1; a < cnt[i]; ++a)  // ascending chunk order
      for (int b = a; b > 0 && lst[i][b - 1] > lst[i][b]; --b) {
        const int32_t x = lst[i][b];
        lst[i][b] = lst[i][b - 1], lst[i][b - 1] = x;
      }
    for (int r = 0; r < Kmax; ++r) out[i][r] = r < cnt[i] ? lst[i][r] : -1;
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

// ---- prefill, head_dim 64: bf16 tensor-core tiles --------------------------------------------------------

constexpr int kB = 64;        // keys per tile; also the head dim of this path
constexpr int kWarps = 4;     // a block: 4 warps of 16 query rows each
constexpr int kPitch = kB + 8;  // bf16 row pitch of the K/V tiles: 144 bytes, so ldmatrix's 8 rows hit 8 bank groups

__global__ void count_kernel(const int32_t* sel, int64_t n_entries, int H, int Kmax, int64_t nch, int* counts) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n_entries; e += int64_t(gridDim.x) * blockDim.x) {
    const int n = sel[e];
    if (n >= 0) atomicAdd(&counts[((e / Kmax) % H) * nch + n], 1);
  }
}

// offsets: exclusive sum of counts; group_offsets [n + 1]: exclusive sum of the `group`-query groups per bucket.
__global__ void scan_kernel(const int* counts, int64_t n, int group, int* offsets, int* group_offsets) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int acc = 0, groups = 0;
  for (int64_t i = 0; i < n; ++i) {
    offsets[i] = acc, group_offsets[i] = groups;
    acc += counts[i], groups += (counts[i] + group - 1) / group;
  }
  group_offsets[n] = groups;
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

// Precision of the tile products. split: Q and P are split into bf16 hi + lo, and so are fp32 K and V (kv_lo;
// bf16 K and V are exact): x·y ≈ xh·yh + xh·yl + xl·yh, ~16 significant bits. Otherwise one bf16 rounding
// of each operand (~3 significant digits, a third of the tensor-core work).
template <bool kSplit, bool kKvLo>
struct Prec {
  static constexpr bool split = kSplit;
  static constexpr bool kv_lo = kKvLo;
  // Query rows per warp = 16·m_tiles (two m-tiles where the registers allow: the single-bf16 fragments).
  static constexpr int m_tiles = kSplit ? 1 : 2;
  static constexpr int queries = kWarps * 16 * m_tiles;  // per block
};
// sparse_attention buckets pairs before it picks the kernel: both split variants must group alike.
static_assert(Prec<true, true>::queries == Prec<true, false>::queries);

// One key tile in shared memory, bf16, rows = keys (pitch kPitch); Kl/Vl only with kv_lo.
struct KvTile {
  const __nv_bfloat16 *Kh, *Vh, *Kl, *Vl;
};

// bf16 keys/values as the tiles read them: [len, C] rows; Kl/Vl (the low halves) only with kv_lo.
struct KvSource {
  const __nv_bfloat16 *Kh, *Vh, *Kl, *Vl;
};

// Block-wide pipeline over the 64-key tiles of keys [key_begin, key_end) of head `off`: tile i goes to stage
// i % kStages by asynchronous copies issued kStages − 1 tiles ahead of its use. Usage, by every thread:
//   for (s < kStages − 1) fetch(s);   for (i < tiles) { tile = wait(i); fetch(i + kStages − 1); use tile; }
// fetch() of a tile past the end commits an empty group, so wait() always waits for the same group count.
template <typename P>
struct KvPipeline {
  static constexpr int kStages = 3;
  static constexpr int kMatrices = P::kv_lo ? 4 : 2;  // Kh, Vh (, Kl, Vl)
  static constexpr int kMatrix = kB * kPitch;         // bf16 elements of one matrix
  static constexpr size_t smem = size_t(kStages) * kMatrices * kMatrix * sizeof(__nv_bfloat16);

  KvSource src;
  int64_t C, off, key_begin, key_end;
  __nv_bfloat16* base;

  __device__ int tiles() const { return int((key_end - key_begin + kB - 1) / kB); }

  __device__ void fetch(int i) {
    if (i < tiles()) {
      __nv_bfloat16* stage = base + (i % kStages) * kMatrices * kMatrix;
      const int64_t key0 = key_begin + int64_t(i) * kB;
      const int kn = int(min_i64(kB, key_end - key0));
      const __nv_bfloat16* mats[4] = {src.Kh, src.Vh, src.Kl, src.Vl};
      constexpr int kPer = kB * (kB / 8) / (kWarps * 32);  // 16-byte copies per thread per matrix
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int idx = threadIdx.x + k * kWarps * 32, row = idx / (kB / 8), col = idx % (kB / 8) * 8;
        const bool in = row < kn;
        const int64_t at = (in ? key0 + row : key_begin) * C + off + col;
#pragma unroll
        for (int m = 0; m < kMatrices; ++m) cp_async16(stage + m * kMatrix + row * kPitch + col, mats[m] + at, in);
      }
    }
    cp_async_commit();
  }

  // Tile i, once every thread's copies of it have landed; also the barrier after which the stage of tile
  // i − 1 may be refilled.
  __device__ KvTile wait(int i) const {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const __nv_bfloat16* stage = base + (i % kStages) * kMatrices * kMatrix;
    return {stage, stage + kMatrix, P::kv_lo ? stage + 2 * kMatrix : nullptr,
            P::kv_lo ? stage + 3 * kMatrix : nullptr};
  }
};

// Block per row of [0, len): fp32 keys/values rounded to bf16 (hi), and with lo the rounding of the remainder,
// for the rows the tiles read: the queries' own chunks (from own_begin) and chunks some head chose (counts,
// [H][nch]; nullptr: none chosen).
__global__ void kv_to_bf16_kernel(const float* __restrict__ K, const float* __restrict__ V, int64_t C, int64_t chunk,
                                  int64_t own_begin, const int* __restrict__ counts, int H, int64_t nch,
                                  __nv_bfloat16* kh, __nv_bfloat16* vh, __nv_bfloat16* kl, __nv_bfloat16* vl) {
  const int64_t row = blockIdx.x;
  if (row < own_begin) {
    if (!counts) return;
    bool used = false;
    for (int h = 0; h < H; ++h) used |= counts[int64_t(h) * nch + row / chunk] > 0;
    if (!used) return;
  }
  for (int64_t i = row * C + threadIdx.x * 4; i < (row + 1) * C; i += int64_t(blockDim.x) * 4) {
    const float4 k = *reinterpret_cast<const float4*>(K + i), v = *reinterpret_cast<const float4*>(V + i);
    uint2 khi, klo, vhi, vlo;
    if (kl) {
      split_bf16(k.x, k.y, khi.x, klo.x), split_bf16(k.z, k.w, khi.y, klo.y);
      split_bf16(v.x, v.y, vhi.x, vlo.x), split_bf16(v.z, v.w, vhi.y, vlo.y);
      *reinterpret_cast<uint2*>(kl + i) = klo;
      *reinterpret_cast<uint2*>(vl + i) = vlo;
    } else {
      khi = make_uint2(pack_bf16(k.x, k.y), pack_bf16(k.z, k.w));
      vhi = make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
    }
    *reinterpret_cast<uint2*>(kh + i) = khi;
    *reinterpret_cast<uint2*>(vh + i) = vhi;
  }
}

// Flash-attention state of one warp: kMT m-tiles of 16 query rows × 64 dims (warp rows 16·mt + g, + 8). Lane
// (g = lane/4, c = lane%4·2) holds in m-tile mt rows g and g + 8 (index rr = 0, 1), score/output columns
// 8·nt + c, +1 (the m16n8 accumulator layout). m is the running max of the raw (unscaled) scores, l the lane's
// partial sum (the quad's sum after finish()). Two m-tiles share every K/V fragment a warp loads from shared
// memory: half the shared-memory traffic per product.
template <int kMT>
struct WarpState {
  uint32_t qh[kMT][4][4], ql[kMT][4][4];  // Q as A fragments per 16-dim k-step (ql unused without split)
  float o[kMT][8][4], m[kMT][2], l[kMT][2];

  // rows[mt][rr]: this lane's query rows (nullptr = padding row, zero query).
  template <bool kSplit>
  __device__ void init(const float* const (&rows)[kMT][2]) {
    const int c = (threadIdx.x & 3) * 2;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int ks = 0; ks < 4; ++ks)
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // a0a1: (g, c), a2a3: (g+8, c), a4a5: (g, c+8), a6a7: (g+8, c+8)
          const float* row = rows[mt][i & 1];
          const float2 v =
              row ? *reinterpret_cast<const float2*>(row + ks * 16 + (i >> 1) * 8 + c) : make_float2(0, 0);
          if constexpr (kSplit) split_bf16(v.x, v.y, qh[mt][ks][i], ql[mt][ks][i]);
          else qh[mt][ks][i] = pack_bf16(v.x, v.y);
        }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[mt][nt][e] = 0.f;
      m[mt][0] = m[mt][1] = -INFINITY;
      l[mt][0] = l[mt][1] = 0.f;
    }
  }

  // One 64-key tile from shared memory. kMask: valid(mt, rr, col) says whether row (mt, rr) may see tile key
  // col. sl2 = softmax scale · log2(e).
  template <typename P, bool kMask, typename Valid>
  __device__ void tile(const KvTile& kv, float sl2, Valid valid) {
    const int lane = threadIdx.x & 31, c = (lane & 3) * 2;
    float s[kMT][8][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
    // S = Q·Kᵀ: K rows are keys, so a plain ldmatrix of an 8-key × 8-dim block is a B fragment; x4 takes
    // dims [32kp, 32kp + 32) = two k-steps.
#pragma unroll
    for (int kp = 0; kp < 2; ++kp)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int at = (nt * 8 + (lane & 7)) * kPitch + kp * 32 + (lane >> 3) * 8;
        uint32_t b[4], bl[4];
        ldmatrix_x4(b, smem_addr(kv.Kh + at));
        if constexpr (P::kv_lo) ldmatrix_x4(bl, smem_addr(kv.Kl + at));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          if constexpr (P::split) {
            mma_bf16(s[mt][nt], ql[mt][2 * kp], b[0], b[1]);
            mma_bf16(s[mt][nt], ql[mt][2 * kp + 1], b[2], b[3]);
          }
          if constexpr (P::kv_lo) {
            mma_bf16(s[mt][nt], qh[mt][2 * kp], bl[0], bl[1]);
            mma_bf16(s[mt][nt], qh[mt][2 * kp + 1], bl[2], bl[3]);
          }
          mma_bf16(s[mt][nt], qh[mt][2 * kp], b[0], b[1]);
          mma_bf16(s[mt][nt], qh[mt][2 * kp + 1], b[2], b[3]);
        }
      }
    // Online softmax over the tile (a row's 64 columns live in one quad).
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      float mx[2] = {m[mt][0], m[mt][1]};
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if constexpr (kMask)
            if (!valid(mt, e >> 1, nt * 8 + c + (e & 1))) s[mt][nt][e] = -INFINITY;
          mx[e >> 1] = fmaxf(mx[e >> 1], s[mt][nt][e]);
        }
      float base[2], corr[2];
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 1));
        mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 2));
        base[rr] = mx[rr] == -INFINITY ? 0.f : mx[rr] * sl2;  // a row with nothing visible yet keeps p = 0
        corr[rr] = exp2f(m[mt][rr] * sl2 - base[rr]);
        m[mt][rr] = mx[rr];
        l[mt][rr] *= corr[rr];
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][nt][e] = exp2f(fmaf(s[mt][nt][e], sl2, -base[e >> 1]));
          l[mt][e >> 1] += s[mt][nt][e];
          o[mt][nt][e] *= corr[e >> 1];
        }
    }
    // O += P·V: the accumulators of score tiles 2j, 2j+1 are the A fragment of key step j; V rows are keys,
    // so ldmatrix.trans of 8-key × 8-dim blocks gives B fragments (x4: keys 16j..+16 × dims 16dp..+16).
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t ph[kMT][4], pl[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const float(&s0)[4] = s[mt][2 * j];
        const float(&s1)[4] = s[mt][2 * j + 1];
        if constexpr (P::split) {
          split_bf16(s0[0], s0[1], ph[mt][0], pl[mt][0]);
          split_bf16(s0[2], s0[3], ph[mt][1], pl[mt][1]);
          split_bf16(s1[0], s1[1], ph[mt][2], pl[mt][2]);
          split_bf16(s1[2], s1[3], ph[mt][3], pl[mt][3]);
        } else {
          ph[mt][0] = pack_bf16(s0[0], s0[1]);
          ph[mt][1] = pack_bf16(s0[2], s0[3]);
          ph[mt][2] = pack_bf16(s1[0], s1[1]);
          ph[mt][3] = pack_bf16(s1[2], s1[3]);
        }
      }
#pragma unroll
      for (int dp = 0; dp < 4; ++dp) {
        const int at = (j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + dp * 16 + (lane >> 4) * 8;
        uint32_t b[4], bl[4];
        ldmatrix_x4_trans(b, smem_addr(kv.Vh + at));
        if constexpr (P::kv_lo) ldmatrix_x4_trans(bl, smem_addr(kv.Vl + at));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          if constexpr (P::split) {
            mma_bf16(o[mt][2 * dp], pl[mt], b[0], b[1]);
            mma_bf16(o[mt][2 * dp + 1], pl[mt], b[2], b[3]);
          }
          if constexpr (P::kv_lo) {
            mma_bf16(o[mt][2 * dp], ph[mt], bl[0], bl[1]);
            mma_bf16(o[mt][2 * dp + 1], ph[mt], bl[2], bl[3]);
          }
          mma_bf16(o[mt][2 * dp], ph[mt], b[0], b[1]);
          mma_bf16(o[mt][2 * dp + 1], ph[mt], b[2], b[3]);
        }
      }
    }
  }

  // Sums l over the quad; afterwards every lane of a row has its full denominator.
  __device__ void finish() {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        l[mt][rr] += __shfl_xor_sync(0xffffffffu, l[mt][rr], 1);
        l[mt][rr] += __shfl_xor_sync(0xffffffffu, l[mt][rr], 2);
      }
  }
};

// Block row (in [0, P::queries)) of this lane's m-tile mt, row rr.
template <typename P>
__device__ __forceinline__ int block_row(int mt, int rr) {
  return (threadIdx.x / 32) * 16 * P::m_tiles + mt * 16 + (threadIdx.x & 31) / 4 + rr * 8;
}

// Block b covers group b − group_offsets[i] (P::queries pairs) of bucket i = h·nch + n (queries of head h that
// chose chunk n): attends them to the chunk's keys and writes each pair's normalised output and log-sum-exp.
// Blocks past the last group exit.
template <typename P>
__global__ void __launch_bounds__(kWarps * 32) chunk_attend_kernel(
    const float* __restrict__ q, KvSource kvs, const int* __restrict__ counts, const int* __restrict__ offsets,
    const int* __restrict__ group_offsets, const int* __restrict__ list, int64_t C, int H, int64_t nch,
    int64_t chunk, int Kmax, float scale, float* __restrict__ pacc, float* __restrict__ plse) {
  constexpr int kMT = P::m_tiles;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t nb = int64_t(H) * nch;
  const int b = int(blockIdx.x);
  if (b >= group_offsets[nb]) return;
  int64_t lo = 0, hi = nb - 1;  // the bucket i with group_offsets[i] ≤ b < group_offsets[i + 1]
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (group_offsets[mid] <= b) lo = mid;
    else hi = mid - 1;
  }
  const int64_t bucket = lo, n = bucket % nch;
  const int h = int(bucket / nch);
  const int g0 = (b - group_offsets[bucket]) * P::queries, rows = min(P::queries, counts[bucket] - g0);
  const int c = (threadIdx.x & 3) * 2;
  const int64_t off = int64_t(h) * kB;
  int entry[kMT][2];  // as `list` stores them
  const float* qrow[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = block_row<P>(mt, rr);
      entry[mt][rr] = r < rows ? list[offsets[bucket] + g0 + r] : -1;
      qrow[mt][rr] = entry[mt][rr] >= 0 ? q + int64_t(entry[mt][rr]) / (int64_t(H) * Kmax) * C + off : nullptr;
    }
  WarpState<kMT> st;
  st.template init<P::split>(qrow);
  const float sl2 = scale * 1.4426950408889634f;
  KvPipeline<P> pipe{kvs, C, off, n * chunk, (n + 1) * chunk, reinterpret_cast<__nv_bfloat16*>(smem_raw)};
  for (int i = 0; i < pipe.kStages - 1; ++i) pipe.fetch(i);
  for (int i = 0, tiles = pipe.tiles(); i < tiles; ++i) {
    const KvTile kv = pipe.wait(i);
    pipe.fetch(i + pipe.kStages - 1);
    const int kn = int(min_i64(kB, pipe.key_end - pipe.key_begin - int64_t(i) * kB));
    if (kn == kB) st.template tile<P, false>(kv, sl2, [](int, int, int) { return true; });
    else st.template tile<P, true>(kv, sl2, [&](int, int, int col) { return col < kn; });
  }
  st.finish();
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t e = entry[mt][rr];
      if (e < 0) continue;
      const float inv = 1.f / st.l[mt][rr];
      float* dst = pacc + e * kB + c;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
        *reinterpret_cast<float2*>(dst + nt * 8) =
            make_float2(st.o[mt][nt][2 * rr] * inv, st.o[mt][nt][2 * rr + 1] * inv);
      if (c == 0) plse[e] = st.m[mt][rr] * scale + logf(st.l[mt][rr]);
    }
}

// Grid (⌈T/P::queries⌉, H): causal own-chunk attention for P::queries queries, merged with their chosen chunks'
// partials.
template <typename P>
__global__ void __launch_bounds__(kWarps * 32) own_attend_kernel(
    const float* __restrict__ q, KvSource kvs, const int32_t* __restrict__ sel, const float* __restrict__ pacc,
    const float* __restrict__ plse, int64_t C, int H, int64_t T, int64_t first, int64_t chunk, int Kmax, float scale,
    float* __restrict__ out) {
  constexpr int kMT = P::m_tiles;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int h = blockIdx.y, c = (threadIdx.x & 3) * 2;
  const int64_t q0 = int64_t(blockIdx.x) * P::queries, off = int64_t(h) * kB;
  const int rows = int(min_i64(P::queries, T - q0));
  const int64_t t_first = first + q0, t_last = t_first + rows - 1;
  int64_t t[kMT][2], lo[kMT][2];
  const float* qrow[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = block_row<P>(mt, rr);
      t[mt][rr] = r < rows ? t_first + r : -1;  // -1: padding row, sees no key
      lo[mt][rr] = t[mt][rr] >= 0 ? t[mt][rr] / chunk * chunk : 0;
      qrow[mt][rr] = r < rows ? q + (q0 + r) * C + off : nullptr;
    }
  WarpState<kMT> st;
  st.template init<P::split>(qrow);
  const float sl2 = scale * 1.4426950408889634f;
  const int64_t last_chunk_start = t_last / chunk * chunk;
  KvPipeline<P> pipe{kvs, C, off, t_first / chunk * chunk, t_last + 1, reinterpret_cast<__nv_bfloat16*>(smem_raw)};
  for (int i = 0; i < pipe.kStages - 1; ++i) pipe.fetch(i);
  for (int i = 0, tiles = pipe.tiles(); i < tiles; ++i) {
    const KvTile kv = pipe.wait(i);
    pipe.fetch(i + pipe.kStages - 1);
    const int64_t key0 = pipe.key_begin + int64_t(i) * kB;
    const int kn = int(min_i64(kB, t_last - key0 + 1));
    // Tiles wholly before every query and inside every query's chunk need no mask.
    if (kn == kB && rows == P::queries && key0 + kB - 1 <= t_first && key0 >= last_chunk_start)
      st.template tile<P, false>(kv, sl2, [](int, int, int) { return true; });
    else
      st.template tile<P, true>(kv, sl2, [&](int mt, int rr, int col) {
        const int64_t s = key0 + col;
        return s <= t[mt][rr] && s >= lo[mt][rr];
      });
  }
  st.finish();
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      if (t[mt][rr] < 0) continue;
      const int64_t tl = q0 + block_row<P>(mt, rr);
      const float own_lse = st.m[mt][rr] * scale + logf(st.l[mt][rr]);
      float M = own_lse;
      for (int i = 0; i < Kmax; ++i) {
        const int64_t e = (tl * H + h) * Kmax + i;
        if (sel[e] >= 0) M = fmaxf(M, plse[e]);
      }
      const float w_own = expf(own_lse - M);
      float wsum = w_own, res[8][2];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int x = 0; x < 2; ++x) res[nt][x] = st.o[mt][nt][2 * rr + x] * (w_own / st.l[mt][rr]);
      for (int i = 0; i < Kmax; ++i) {
        const int64_t e = (tl * H + h) * Kmax + i;
        if (sel[e] < 0) continue;
        const float w = expf(plse[e] - M);
        wsum += w;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const float2 p = *reinterpret_cast<const float2*>(pacc + e * kB + nt * 8 + c);
          res[nt][0] += w * p.x, res[nt][1] += w * p.y;
        }
      }
      const float inv = 1.f / wsum;
      float* dst = out + tl * C + off + c;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
        *reinterpret_cast<float2*>(dst + nt * 8) = make_float2(res[nt][0] * inv, res[nt][1] * inv);
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

// Calls f.template operator()<P>() with P the prefill tiles' precision.
template <typename F>
void with_prefill_precision(bool split, bool kv_lo, F&& f) {
  if (!split) f.template operator()<Prec<false, false>>();
  else if (kv_lo) f.template operator()<Prec<true, true>>();
  else f.template operator()<Prec<true, false>>();
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

void CudaBackend::grow_kv_cache(KvCache& cache, int64_t rows, int64_t C, int chunk) {
  RWKVX_ASSERT(cache.k.empty() || cache.k.row_size() == C, "kv cache: row size changed");
  const int64_t cap = (rows + chunk - 1) / chunk * chunk;
  // Rows past len are never read: no need to clear them.
  Tensor nk = alloc_uninit(cache.dtype, {cap, C}), nv = alloc_uninit(cache.dtype, {cap, C});
  Tensor nm = alloc_uninit(DType::f32, {cap / chunk, C});
  if (cache.len > 0) {
    const size_t row = size_t(C) * dtype_size(cache.dtype);
    RWKVX_CUDA_CHECK(cudaMemcpyAsync(nk.data, cache.k.data, size_t(cache.len) * row, cudaMemcpyDeviceToDevice, stream()));
    RWKVX_CUDA_CHECK(cudaMemcpyAsync(nv.data, cache.v.data, size_t(cache.len) * row, cudaMemcpyDeviceToDevice, stream()));
    RWKVX_CUDA_CHECK(cudaMemcpyAsync(nm.data, cache.chunk_mean.data, size_t(cache.n_chunks * C) * 4,
                                     cudaMemcpyDeviceToDevice, stream()));
  }
  cache.k = nk, cache.v = nv, cache.chunk_mean = nm;
}

void CudaBackend::kv_append(KvCache& cache, const Tensor& k, const Tensor& v, int chunk) {
  OpTimer timer_(this, "kv_append");
  const int64_t T = k.rows(), C = k.row_size();
  RWKVX_ASSERT(chunk > 0 && (cache.len == 0 || cache.chunk == chunk), "kv_append: chunk size changed");
  RWKVX_ASSERT(cache.dtype == DType::f32 || cache.dtype == DType::bf16, "kv_append: KV dtype must be f32 or bf16");
  if (!cache.k.empty()) cache.dtype = cache.k.dtype;
  cache.chunk = chunk;
  const int64_t need = cache.len + T;
  const int64_t cap = cache.k.empty() ? 0 : cache.k.rows();
  if (need > cap) grow_kv_cache(cache, std::max<int64_t>(need, 2 * cap), C, chunk);
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

void* CudaBackend::kv_split_buffer(size_t bytes, size_t hint) {
  if (kv_split_.empty() || kv_split_.nbytes() < bytes) {
    const size_t want = std::max({bytes, hint, kv_split_.empty() ? 0 : kv_split_.nbytes() / 2 * 3});
    kv_split_ = Tensor{};  // the old one goes back first
    kv_split_ = scratch(want);
  }
  return kv_split_.data;
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
    const int64_t per_query = H * Kmax * 8;  // bytes of `best` scratch (lists too long for shared memory)
    const int64_t batch = std::max<int64_t>(1, std::min<int64_t>(T, (int64_t(64) << 20) / per_query));
    Tensor best = scratch(Kmax <= kGateSharedKeep ? 8 : size_t(batch * per_query));
    const int Dp = int((D + kGateDims - 1) / kGateDims * kGateDims);
    const size_t smem = gate_smem(Dp, Kmax);
    if (smem > 48 * 1024)
      RWKVX_CUDA_CHECK(cudaFuncSetAttribute(gate_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    for (int64_t t0 = 0; t0 < T; t0 += batch) {
      const int64_t nq = std::min(batch, T - t0);
      gate_kernel<<<dim3(unsigned((nq + kGateQueries - 1) / kGateQueries), unsigned(H)), kGateThreads, smem,
                    stream()>>>(ptr<float>(q), ptr<float>(cache.chunk_mean), C, int(D), int(H), first, t0, nq, c, Kp,
                                Kmax, static_cast<double*>(best.data), sel);
      RWKVX_CUDA_LAUNCHED();
    }
  }

  // 2. Attention.
  if (D == kB && T >= 32) {
    // Tile precision: hi + lo split unless single bf16 is asked for (for everything, or attention only).
    const bool split = !opt_.single_bf16_activations && !opt_.single_bf16_attention;
    const bool f32_kv = cache.k.dtype == DType::f32, kv_lo = split && f32_kv;
    const int block_queries = split ? Prec<true, false>::queries : Prec<false, false>::queries;  // per group
    const int64_t nb = H * jmax;
    Tensor meta, list, pacc, plse;
    int *counts = nullptr, *offsets = nullptr, *group_offsets = nullptr;
    if (Kmax > 0) {  // bucket the (query, chunk) pairs by (head, chunk)
      const int64_t n_entries = T * H * Kmax;
      meta = alloc(DType::f32, {4 * nb + 1});  // counts, cursor (zeroed), offsets, group offsets
      counts = static_cast<int*>(meta.data);
      int* cursor = counts + nb;
      offsets = cursor + nb;
      group_offsets = offsets + nb;
      list = scratch(size_t(n_entries) * 4);
      pacc = scratch(size_t(n_entries * kB) * 4);
      plse = scratch(size_t(n_entries) * 4);
      const unsigned g = std::min<unsigned>(grid_for(n_entries, 256), 65536u);
      count_kernel<<<g, 256, 0, stream()>>>(sel, n_entries, int(H), Kmax, jmax, counts);
      scan_kernel<<<1, 32, 0, stream()>>>(counts, nb, block_queries, offsets, group_offsets);
      scatter_kernel<<<g, 256, 0, stream()>>>(sel, n_entries, int(H), Kmax, jmax, offsets, cursor,
                                              static_cast<int*>(list.data));
      RWKVX_CUDA_LAUNCHED();
    }
    // The tiles read bf16: a bf16 cache as it is; an fp32 one rounded (and split) once here, for the rows read.
    KvSource kvs{};
    if (f32_kv) {
      OpTimer convert_timer(this, "sparse_attention.kv_bf16");
      const int64_t L = cache.len, n = L * C;
      // Sized for the cache's capacity, so it is made again only when the cache has grown.
      auto* b = static_cast<__nv_bfloat16*>(kv_split_buffer(size_t(n) * 2 * (kv_lo ? 4 : 2),
                                                            size_t(cache.k.rows() * C) * 2 * (kv_lo ? 4 : 2)));
      kvs = {b, b + n, kv_lo ? b + 2 * n : nullptr, kv_lo ? b + 3 * n : nullptr};
      RWKVX_ASSERT(C % 4 == 0, "sparse_attention: C must be a multiple of 4");
      kv_to_bf16_kernel<<<unsigned(L), 128, 0, stream()>>>(ptr<float>(cache.k), ptr<float>(cache.v), C, c,
                                                            first / c * c, counts, int(H), jmax,
                                                            const_cast<__nv_bfloat16*>(kvs.Kh),
                                                            const_cast<__nv_bfloat16*>(kvs.Vh),
                                                            const_cast<__nv_bfloat16*>(kvs.Kl),
                                                            const_cast<__nv_bfloat16*>(kvs.Vl));
      RWKVX_CUDA_LAUNCHED();
    } else {
      kvs = {ptr<__nv_bfloat16>(cache.k), ptr<__nv_bfloat16>(cache.v), nullptr, nullptr};
    }
    if (Kmax > 0) {
      OpTimer chunk_timer(this, "sparse_attention.chunks");
      // Σ⌈count/q⌉ ≤ n_entries/q + buckets: an upper bound on the groups, known without a copy back.
      const unsigned blocks = unsigned((T * H * Kmax + block_queries - 1) / block_queries + nb);
      with_prefill_precision(split, kv_lo, [&]<typename P>() {
        const auto kernel = chunk_attend_kernel<P>;
        const size_t smem = KvPipeline<P>::smem;
        RWKVX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
        kernel<<<blocks, kWarps * 32, smem, stream()>>>(ptr<float>(q), kvs, counts, offsets, group_offsets,
                                                        static_cast<const int*>(list.data), C, int(H), jmax, c, Kmax,
                                                        scale, mptr<float>(pacc), mptr<float>(plse));
      });
      RWKVX_CUDA_LAUNCHED();
    }
    OpTimer own_timer(this, "sparse_attention.own");
    with_prefill_precision(split, kv_lo, [&]<typename P>() {
      const auto kernel = own_attend_kernel<P>;
      const size_t smem = KvPipeline<P>::smem;
      RWKVX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kernel<<<dim3(unsigned((T + block_queries - 1) / block_queries), unsigned(H)), kWarps * 32, smem, stream()>>>(
          ptr<float>(q), kvs, sel, Kmax ? ptr<float>(pacc) : nullptr, Kmax ? ptr<float>(plse) : nullptr, C, int(H), T,
          first, c, Kmax, scale, mptr<float>(out));
    });
    RWKVX_CUDA_LAUNCHED();
    return;
  }
  // Decode / other head sizes: split each query's keys over S blocks (≈ 512 keys each, enough blocks to
  // fill the GPU when few queries are in flight), then merge. Prefill's bf16 copy of the cache is not
  // needed here: give its memory back.
  drop_prefill_scratch();
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
