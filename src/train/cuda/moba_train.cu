// Training top-k chunk sparse attention (MoBA, spec model.md §5) on the GPU: moba_forward / moba_backward of
// train_ops_cuda.h, whose reference and test oracle are the CPU functions of the same names in
// src/train/ops/sparse_attention.h. Tests: tests/cuda/test_train_moba.cpp (suite TrainCudaMoba).
//
// Steps, all on the caller's stream (scratch from cudaMallocAsync on it):
//  1. chunk means of k over the complete chunks (a thread per channel, fp64 sum in position order, rounded to S,
//     as the CPU);
//  2. gate: a thread per (query, head) scores its candidate chunks q·mean in fp64 without contraction (the
//     CPU's sum, in its order, so the choice and its ties, lower chunk first, are the CPU's bit for bit) and
//     writes the top-(k-1), ascending, -1 after them;
//  3. attention masks: for each head, chunk n and block of 64 queries, a 64-bit word whose bit r says that
//     query r of the block attends chunk n (selected, or its own chunk, causally);
//  4. attention, one of two paths:
//     * fast (float, head size 64, chunk a multiple of 64): bf16 tensor cores (mma.sync m16n8k16, fp32
//       accumulators), 64-key tiles copied asynchronously (3 stages) from bf16 copies of the inputs, 4 warps.
//       The (query, selected chunk) pairs are bucketed by (head, chunk), ascending in the query (from the mask
//       words: scan, prefix, fill; no atomics), so work is exactly the keys each query attends to, however
//       much neighbouring queries disagree. Query-major, in three modes (forward online softmax; Δ = Σ p·dp;
//       dq = Σ p (dp − Δ) k): a selected-chunk kernel takes 128 pairs of a bucket (two 16-row m-tiles per
//       warp) through their chunk's keys and writes a partial per pair; an own-chunk kernel runs each query
//       block's causal own chunk and merges the partials in slot order (forward: one softmax over the union;
//       o and lse from the partials' lse). Backward recomputes p from the saved lse: Δ = dout·o as Σ_s p_s
//       dout·v_s (o is never formed, nor the saved output used), then dq, then a key-major kernel for dk, dv:
//       each 64-key block runs its own chunk's later query blocks, then its chunk's bucket in groups of 64
//       pairs (gathered rows), in ascending order. Error vs the CPU: ~3e-3 relative to the largest value
//       (bf16 operands).
//     * exact (double; float when RWKVX_CUDA_TRAIN_EXACT_ATTN=1 or set_moba_exact_attention(1); any head
//       size ≤ 64 and any chunk): CUDA cores in S arithmetic, 64 × 64 tiles, 256 threads each holding a 4 × 4
//       piece. The query-major kernels (forward; Δ and dq) visit the 64-key blocks whose mask word is non-zero
//       for their query block, the key-major kernel (dk, dv) the query blocks whose word is non-zero for its
//       key block; inside a tile the bit and causality mask single pairs. Simple, but a tile visits the union
//       of its queries' chunks: slow at long T when neighbouring queries choose differently.
// Every output element is written by one thread that sums in a fixed order: no atomics on floating point
// values, so runs are bit-for-bit repeatable. Backward adds into dq, dk, dv.
//
// Times (H100, float, C = 768, D = 64, chunk = 2048, top_k = 3, random inputs; TrainCudaMoba.DISABLED_Timing):
// T = 4096: forward 0.45 ms, backward 0.74 ms; T = 65536: forward 4.7 ms, backward 15.6 ms (~0.9 TFLOP forward,
// ~200 TFLOP/s in the attention kernels). Exact fp32 at T = 4096: 3.5 / 13.9 ms.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "core/error.h"
#include "backend/cuda/tensor_core.cuh"
#include "train/cuda/train_ops_cuda.h"

namespace rwkvx::train::cuda {

namespace {

using namespace rwkvx::tensor_core;

int g_exact_mode = -1;

void moba_check(cudaError_t e, const char* what, int line) {
  if (e != cudaSuccess)
    throw Error(std::string("moba (CUDA) ") + what + " at moba_train.cu:" + std::to_string(line) + ": " +
                cudaGetErrorString(e));
}
#define MOBA_CHECK(expr) moba_check((expr), #expr, __LINE__)
#define MOBA_LAUNCHED() moba_check(cudaGetLastError(), "kernel launch", __LINE__)

constexpr int kB = 64;           // queries per query block, keys per key block
constexpr int kPitch = kB + 8;   // bf16 row pitch of the shared tiles (16-byte rows offset: no ldmatrix conflicts)
constexpr int kFastWarps = 4;    // fast kernels: 4 warps × 16 rows
constexpr int kStages = 3;       // cp.async pipeline depth
constexpr int kExactThreads = 256;

// ---- shared steps: chunk means, gate, masks ------------------------------------------------------------

// Grid (complete chunks, ⌈C/128⌉): mean of k over each chunk, summed in double in position order.
template <class S>
__global__ void chunk_mean_kernel(const S* __restrict__ k, int64_t C, int64_t chunk, S* __restrict__ mean) {
  const int64_t n = blockIdx.x, c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double s = 0;
  int64_t r = n * chunk;
  const int64_t end = (n + 1) * chunk;
  for (; r + 8 <= end; r += 8) {  // eight loads in flight, then the sums in position order
    S x[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = k[(r + i) * C + c];
#pragma unroll
    for (int i = 0; i < 8; ++i) s = __dadd_rn(s, double(x[i]));
  }
  for (; r < end; ++r) s = __dadd_rn(s, double(k[r * C + c]));
  mean[n * C + c] = S(s / double(chunk));
}

constexpr int kGateThreads = 128;
constexpr int kGateChunks = 16;  // chunk means per shared tile

// Shared memory of gate_kernel: a tile of means [16][D+1] (double), the top lists ([128][K1] scores, double, and
// chunks, int), the block's q rows [128][D+1] (S).
inline size_t gate_smem_bytes(int D, int K1, size_t s_bytes) {
  return size_t(kGateThreads) * (D + 1) * s_bytes + size_t(kGateChunks) * (D + 1) * 8 + size_t(kGateThreads) * K1 * 12;
}

// Grid (⌈T/128⌉, H): a thread per query t of head y. Scores in fp64 with explicit round-to-nearest products and
// sums (no fused multiply-add), d in order, as the CPU reference computes them. The top list lives in shared
// memory sorted by (score desc, chunk asc): a later chunk enters only when it beats the last entry strictly.
template <class S>
__global__ void __launch_bounds__(kGateThreads) gate_kernel(const S* __restrict__ q, const S* __restrict__ mean,
                                                            int64_t T, int64_t C, int D, int H, int64_t chunk, int K1,
                                                            int32_t* __restrict__ sel) {
  extern __shared__ __align__(16) unsigned char gate_raw[];
  double* ms = reinterpret_cast<double*>(gate_raw);                 // [16][D+1]
  double* bs_all = ms + kGateChunks * (D + 1);                      // [128][K1]
  int* bi_all = reinterpret_cast<int*>(bs_all + kGateThreads * K1);  // [128][K1]
  S* qs = reinterpret_cast<S*>(bi_all + kGateThreads * K1);      // [128][D+1] (8-byte aligned: 512·K1 bytes above)
  const int h = blockIdx.y;
  const int64_t t0 = int64_t(blockIdx.x) * kGateThreads, t = t0 + threadIdx.x;
  for (int i = threadIdx.x; i < kGateThreads * D; i += kGateThreads) {  // coalesced rows of the block's queries
    const int r = i / D, d = i % D;
    qs[r * (D + 1) + d] = t0 + r < T ? q[(t0 + r) * C + int64_t(h) * D + d] : S(0);
  }
  const bool valid = t < T;
  double* bs = bs_all + threadIdx.x * K1;
  int* bi = bi_all + threadIdx.x * K1;
  const int64_t j = valid ? t / chunk : 0;
  const int64_t j_block = ((t0 + kGateThreads < T ? t0 + kGateThreads : T) - 1) / chunk;  // the most candidates
  const int n_sel = int(j < K1 ? j : K1);
  const S* qr = qs + threadIdx.x * (D + 1);
  int cnt = 0;
  for (int64_t n0 = 0; n0 < j_block; n0 += kGateChunks) {
    const int nt = int(j_block - n0 < kGateChunks ? j_block - n0 : kGateChunks);
    __syncthreads();  // q rows stored; the previous tile consumed
    for (int i = threadIdx.x; i < nt * D; i += kGateThreads) {
      const int cc = i / D, d = i % D;
      ms[cc * (D + 1) + d] = double(mean[(n0 + cc) * C + int64_t(h) * D + d]);
    }
    __syncthreads();
    const int mine = int(j - n0 < nt ? (j - n0 > 0 ? j - n0 : 0) : nt);  // this query's candidates in the tile
    for (int c0 = 0; c0 < mine; c0 += 4) {
      // Four independent sums (each over d in order), then the insertions in chunk order.
      double sc[4] = {0, 0, 0, 0};
      for (int d = 0; d < D; ++d) {
        const double qd = double(qr[d]);
#pragma unroll
        for (int u = 0; u < 4; ++u)
          if (c0 + u < kGateChunks) sc[u] = __dadd_rn(sc[u], __dmul_rn(qd, ms[(c0 + u) * (D + 1) + d]));
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (c0 + u >= mine) break;
        const double s = sc[u];
        int pos;
        if (cnt < n_sel) pos = cnt++;
        else if (s > bs[n_sel - 1]) pos = n_sel - 1;
        else continue;
        while (pos > 0 && s > bs[pos - 1]) {  // equal scores keep the earlier (lower) chunk first
          bs[pos] = bs[pos - 1], bi[pos] = bi[pos - 1];
          --pos;
        }
        bs[pos] = s, bi[pos] = int(n0 + c0 + u);
      }
    }
  }
  if (!valid) return;
  for (int a = 1; a < n_sel; ++a)  // ascending chunk order
    for (int b = a; b > 0 && bi[b] < bi[b - 1]; --b) {
      const int x = bi[b];
      bi[b] = bi[b - 1], bi[b - 1] = x;
    }
  int32_t* out = sel + (t * H + h) * K1;
  for (int i = 0; i < K1; ++i) out[i] = i < n_sel ? bi[i] : -1;
}

// Grid (query blocks, H), 64 threads: mask[(h·nch + n)·nqb + qb] gets bit r when query qb·64 + r attends chunk n.
__global__ void mask_kernel(const int32_t* __restrict__ sel, int64_t T, int H, int64_t chunk, int K1, int64_t nch,
                            int64_t nqb, unsigned long long* __restrict__ mask) {
  const int h = blockIdx.y;
  const int64_t qb = blockIdx.x, t = qb * kB + threadIdx.x;
  if (t >= T) return;
  const unsigned long long bit = 1ull << threadIdx.x;
  atomicOr(&mask[(int64_t(h) * nch + t / chunk) * nqb + qb], bit);
  for (int i = 0; i < K1; ++i) {
    const int s = sel[(t * H + h) * K1 + i];
    if (s >= 0) atomicOr(&mask[(int64_t(h) * nch + s) * nqb + qb], bit);
  }
}

// The OR of the mask words of the chunks that key block kb overlaps, for query block qb.
__device__ __forceinline__ unsigned long long block_mask(const unsigned long long* __restrict__ mask, int64_t T,
                                                         int64_t chunk, int64_t nch, int64_t nqb, int h, int64_t kb,
                                                         int64_t qb) {
  const int64_t s0 = kb * kB, s1 = (kb + 1) * kB < T ? (kb + 1) * kB - 1 : T - 1;
  unsigned long long m = 0;
  for (int64_t n = s0 / chunk; n <= s1 / chunk; ++n) m |= mask[(int64_t(h) * nch + n) * nqb + qb];
  return m;
}

// Every thread calls: the i in [0, n) with keep(i), in ascending order, into list; returns how many (to all
// threads, after a barrier that makes list visible). counts: shared scratch of one int per warp.
template <class Keep>
__device__ int build_list(int n, int* list, int* counts, Keep keep) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int total = 0;
  for (int base = 0; base < n; base += blockDim.x) {
    const int i = base + int(threadIdx.x);
    const bool f = i < n && keep(i);
    const unsigned m = __ballot_sync(0xffffffffu, f);
    if (lane == 0) counts[warp] = __popc(m);
    __syncthreads();
    int off = total, sum = 0;
    for (int w = 0; w < nw; ++w) {
      if (w < warp) off += counts[w];
      sum += counts[w];
    }
    if (f) list[off + __popc(m & ((1u << lane) - 1))] = i;
    total += sum;
    __syncthreads();
  }
  return total;
}

// ---- exact path: CUDA cores, S arithmetic -----------------------------------------------------------------
// 256 threads: in the query-major kernels thread (a = tid/16, b = tid%16) holds query rows 4a..4a+3 and key
// columns b, b+16, b+32, b+48 of the score tile, and output dims b, b+16, b+32, b+48 (D ≤ 64). The key-major
// kernel swaps the roles (key rows 4a.., query columns b + 16j).
constexpr int kExactDims = 4;  // dims per thread: D ≤ 64

template <class S>
__device__ __forceinline__ S exp_s(S x) {
  if constexpr (std::is_same_v<S, double>) return exp(x);
  else return expf(x);
}
template <class S>
__device__ __forceinline__ S log_s(S x) {
  if constexpr (std::is_same_v<S, double>) return log(x);
  else return logf(x);
}

// Sum over the 16 lanes that share a row (lanes differing in bits 0..3).
template <class S>
__device__ __forceinline__ S sum16(S v) {
#pragma unroll
  for (int o = 1; o < 16; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <class S>
__device__ __forceinline__ S max16(S v) {
#pragma unroll
  for (int o = 1; o < 16; o <<= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Shared memory of the exact kernels: n_mat S matrices [64][D+1], the P tile(s) [64][65], the mask words of the
// chunks a 64-key block overlaps, the block list and per-warp counts.
struct ExactSmem {
  size_t mats, ptile, masks, list, counts, total;
};
template <class S>
__host__ __device__ ExactSmem exact_smem(int D, int n_mat, int n_p, int64_t list_len) {
  ExactSmem e{};
  e.mats = 0;
  e.ptile = e.mats + size_t(n_mat) * kB * (D + 1) * sizeof(S);
  e.masks = e.ptile + size_t(n_p) * kB * (kB + 1) * sizeof(S);
  e.list = e.masks + size_t(kB) * 8;
  e.counts = e.list + size_t(list_len) * 4;
  e.total = e.counts + 8 * 4;
  return e;
}

// Loads rows [r0, r0 + 64) of head h of x into a [64][D+1] tile; rows ≥ T are zero.
template <class S>
__device__ __forceinline__ void load_rows(S* dst, const S* __restrict__ x, int64_t r0, int64_t T, int64_t C, int D,
                                          int h) {
  for (int i = threadIdx.x; i < kB * D; i += blockDim.x) {
    const int r = i / D, d = i % D;
    dst[r * (D + 1) + d] = r0 + r < T ? x[(r0 + r) * C + int64_t(h) * D + d] : S(0);
  }
}

// Loads the mask words of the chunks key block kb overlaps, for query block qb: masks[n - kb·64/chunk].
__device__ __forceinline__ void load_masks(unsigned long long* masks, const unsigned long long* __restrict__ mask,
                                           int64_t T, int64_t chunk, int64_t nch, int64_t nqb, int h, int64_t kb,
                                           int64_t qb) {
  const int64_t s0 = kb * kB, s1 = (kb + 1) * kB < T ? (kb + 1) * kB - 1 : T - 1;
  const int64_t n0 = s0 / chunk, nn = s1 / chunk - n0 + 1;
  for (int i = threadIdx.x; i < nn; i += blockDim.x) masks[i] = mask[(int64_t(h) * nch + n0 + i) * nqb + qb];
}

// Whether query t (bit r of its block) attends key s, given the mask words of s's block.
__device__ __forceinline__ bool attends(int64_t t, int r, int64_t s, int64_t T, int64_t chunk, int64_t n0,
                                        const unsigned long long* masks) {
  if (s >= T || t >= T) return false;
  const int64_t cs = s / chunk;
  if (!((masks[cs - n0] >> r) & 1ull)) return false;
  return cs != t / chunk || s <= t;
}

struct Geometry {
  int64_t T, C, chunk, nch, nqb, Tp;  // Tp = 64·nqb
  int D, H;
};

// Grid (query blocks, H). mode 0: forward (online softmax; writes out, lse). mode 1: backward query-major
// (sweep 1: o from lse, Δ = dout·o, written to delta; sweep 2: dq += Σ p (dp − Δ) k / √D).
template <class S, int kMode>
__global__ void __launch_bounds__(kExactThreads) exact_query_kernel(
    Geometry g, const S* __restrict__ q, const S* __restrict__ k, const S* __restrict__ v,
    const unsigned long long* __restrict__ mask, S scale, S* __restrict__ out, S* __restrict__ lse,
    const S* __restrict__ dout, S* __restrict__ delta, S* __restrict__ dq) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int D = g.D, P = D + 1;
  const ExactSmem L = exact_smem<S>(D, kMode == 0 ? 3 : 4, 1, g.nqb);
  S* Qs = reinterpret_cast<S*>(smem + L.mats);
  S* Ks = Qs + kB * P;
  S* Vs = Ks + kB * P;
  S* Os = Vs + kB * P;  // dout (mode 1)
  S* Ps = reinterpret_cast<S*>(smem + L.ptile);
  auto* masks = reinterpret_cast<unsigned long long*>(smem + L.masks);
  int* list = reinterpret_cast<int*>(smem + L.list);
  int* counts = reinterpret_cast<int*>(smem + L.counts);
  const int h = blockIdx.y;
  const int64_t qb = blockIdx.x, t0 = qb * kB;
  const int64_t t_last = (t0 + kB < g.T ? t0 + kB : g.T) - 1;
  const int a = threadIdx.x >> 4, b = threadIdx.x & 15;

  const int nk = build_list(int(t_last / kB + 1), list, counts, [&](int kb) {
    return block_mask(mask, g.T, g.chunk, g.nch, g.nqb, h, kb, qb) != 0;
  });
  load_rows(Qs, q, t0, g.T, g.C, D, h);
  if constexpr (kMode == 1) load_rows(Os, dout, t0, g.T, g.C, D, h);

  S o[4][kExactDims], m[4], l[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY, l[i] = 0;
#pragma unroll
    for (int e = 0; e < kExactDims; ++e) o[i][e] = 0;
    if constexpr (kMode == 1) m[i] = t0 + 4 * a + i < g.T ? lse[(t0 + 4 * a + i) * g.H + h] : S(0);
  }
  // sweep: 0 = attention (forward, or o for Δ), 1 = dq.
  S dl[4];
  for (int sweep = 0; sweep < kMode + 1; ++sweep) {
    for (int li = 0; li < nk; ++li) {
      const int64_t kb = list[li], s0 = kb * kB;
      __syncthreads();  // the previous tile is consumed
      load_rows(Ks, k, s0, g.T, g.C, D, h);
      load_rows(Vs, v, s0, g.T, g.C, D, h);
      load_masks(masks, mask, g.T, g.chunk, g.nch, g.nqb, h, kb, qb);
      __syncthreads();
      const int64_t n0 = s0 / g.chunk;
      S sc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) sc[i][j] = 0;
      for (int d = 0; d < D; ++d) {
        S qv[4], kv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) qv[i] = Qs[(4 * a + i) * P + d];
#pragma unroll
        for (int j = 0; j < 4; ++j) kv[j] = Ks[(b + 16 * j) * P + d];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) sc[i][j] += qv[i] * kv[j];
      }
      bool ok[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) ok[i][j] = attends(t0 + 4 * a + i, 4 * a + i, s0 + b + 16 * j, g.T, g.chunk, n0, masks);
      if constexpr (kMode == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          S mx = m[i];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            sc[i][j] = ok[i][j] ? sc[i][j] * scale : S(-INFINITY);
            mx = max(mx, sc[i][j]);
          }
          mx = max16(mx);
          const S corr = mx == S(-INFINITY) ? S(1) : exp_s(m[i] - mx);
          m[i] = mx;
          l[i] *= corr;
#pragma unroll
          for (int e = 0; e < kExactDims; ++e) o[i][e] *= corr;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const S p = ok[i][j] ? exp_s(sc[i][j] - mx) : S(0);
            l[i] += p;
            Ps[(4 * a + i) * (kB + 1) + b + 16 * j] = p;
          }
        }
      } else {
        // p from the saved lse; in sweep 1 ds = p (dp − Δ) / √D with dp = dout·v.
        S dp[4][4];
        if (sweep == 1) {
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) dp[i][j] = 0;
          for (int d = 0; d < D; ++d) {
            S ov[4], vv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) ov[i] = Os[(4 * a + i) * P + d];
#pragma unroll
            for (int j = 0; j < 4; ++j) vv[j] = Vs[(b + 16 * j) * P + d];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
              for (int j = 0; j < 4; ++j) dp[i][j] += ov[i] * vv[j];
          }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            S p = ok[i][j] ? exp_s(sc[i][j] * scale - m[i]) : S(0);
            if (sweep == 1) p = p * (dp[i][j] - dl[i]) * scale;
            Ps[(4 * a + i) * (kB + 1) + b + 16 * j] = p;
          }
      }
      __syncthreads();
      // o += P·V (sweep 0) or dq += dS·K (sweep 1).
      const S* X = sweep == 0 ? Vs : Ks;
      for (int c = 0; c < kB; ++c) {
        S pv[4], xv[kExactDims];
#pragma unroll
        for (int i = 0; i < 4; ++i) pv[i] = Ps[(4 * a + i) * (kB + 1) + c];
#pragma unroll
        for (int e = 0; e < kExactDims; ++e) xv[e] = b + 16 * e < D ? X[c * P + b + 16 * e] : S(0);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int e = 0; e < kExactDims; ++e) o[i][e] += pv[i] * xv[e];
      }
    }
    if constexpr (kMode == 1) {
      if (sweep == 0) {  // Δ = dout·o, then o is reused as the dq accumulator
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          S s = 0;
#pragma unroll
          for (int e = 0; e < kExactDims; ++e) {
            if (b + 16 * e < D) s += Os[(4 * a + i) * P + b + 16 * e] * o[i][e];
            o[i][e] = 0;
          }
          dl[i] = sum16(s);
          const int64_t t = t0 + 4 * a + i;
          if (b == 0 && t < g.T) delta[t * g.H + h] = dl[i];
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t t = t0 + 4 * a + i;
    if constexpr (kMode == 0) {
      const S lt = sum16(l[i]);
      if (t < g.T) {
        if (b == 0) lse[t * g.H + h] = m[i] + log_s(lt);
#pragma unroll
        for (int e = 0; e < kExactDims; ++e)
          if (b + 16 * e < D) out[t * g.C + int64_t(h) * D + b + 16 * e] = o[i][e] / lt;
      }
    } else {
      if (t < g.T)
#pragma unroll
        for (int e = 0; e < kExactDims; ++e)
          if (b + 16 * e < D) dq[t * g.C + int64_t(h) * D + b + 16 * e] += o[i][e];
    }
  }
}

// Grid (key blocks, H): dv += Σ_t p dout, dk += Σ_t p (dp − Δ) q / √D over the query blocks (ascending) that
// attend the block's keys. Thread (a, b): key rows 4a..4a+3, query columns b + 16j, dims b + 16e.
template <class S>
__global__ void __launch_bounds__(kExactThreads) exact_key_kernel(Geometry g, const S* __restrict__ q,
                                                                  const S* __restrict__ k, const S* __restrict__ v,
                                                                  const unsigned long long* __restrict__ mask, S scale,
                                                                  const S* __restrict__ lse, const S* __restrict__ dout,
                                                                  const S* __restrict__ delta, S* __restrict__ dk,
                                                                  S* __restrict__ dv) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int D = g.D, P = D + 1;
  const ExactSmem L = exact_smem<S>(D, 4, 2, g.nqb);
  S* Ks = reinterpret_cast<S*>(smem + L.mats);
  S* Vs = Ks + kB * P;
  S* Qs = Vs + kB * P;
  S* Os = Qs + kB * P;
  S* Ps = reinterpret_cast<S*>(smem + L.ptile);
  S* Ds = Ps + kB * (kB + 1);
  auto* masks = reinterpret_cast<unsigned long long*>(smem + L.masks);
  int* list = reinterpret_cast<int*>(smem + L.list);
  int* counts = reinterpret_cast<int*>(smem + L.counts);
  const int h = blockIdx.y;
  const int64_t kb = blockIdx.x, s0 = kb * kB, n0 = s0 / g.chunk;
  const int a = threadIdx.x >> 4, b = threadIdx.x & 15;
  // Query blocks from kb on (queries before the block's first key attend none of its keys).
  const int nq = build_list(int(g.nqb - kb), list, counts, [&](int i) {
    return block_mask(mask, g.T, g.chunk, g.nch, g.nqb, h, kb, kb + i) != 0;
  });
  load_rows(Ks, k, s0, g.T, g.C, D, h);
  load_rows(Vs, v, s0, g.T, g.C, D, h);
  S gk[4][kExactDims], gv[4][kExactDims];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int e = 0; e < kExactDims; ++e) gk[i][e] = gv[i][e] = 0;
  for (int li = 0; li < nq; ++li) {
    const int64_t qb = kb + list[li], t0 = qb * kB;
    __syncthreads();
    load_rows(Qs, q, t0, g.T, g.C, D, h);
    load_rows(Os, dout, t0, g.T, g.C, D, h);
    load_masks(masks, mask, g.T, g.chunk, g.nch, g.nqb, h, kb, qb);
    __syncthreads();
    S sc[4][4], dp[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sc[i][j] = dp[i][j] = 0;
    for (int d = 0; d < D; ++d) {
      S kv[4], vv[4], qv[4], ov[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) kv[i] = Ks[(4 * a + i) * P + d], vv[i] = Vs[(4 * a + i) * P + d];
#pragma unroll
      for (int j = 0; j < 4; ++j) qv[j] = Qs[(b + 16 * j) * P + d], ov[j] = Os[(b + 16 * j) * P + d];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          sc[i][j] += kv[i] * qv[j];
          dp[i][j] += vv[i] * ov[j];
        }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t t = t0 + b + 16 * j;
      const S lt = t < g.T ? lse[t * g.H + h] : S(0), dt = t < g.T ? delta[t * g.H + h] : S(0);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool ok = attends(t, b + 16 * j, s0 + 4 * a + i, g.T, g.chunk, n0, masks);
        const S p = ok ? exp_s(sc[i][j] * scale - lt) : S(0);
        Ps[(4 * a + i) * (kB + 1) + b + 16 * j] = p;
        Ds[(4 * a + i) * (kB + 1) + b + 16 * j] = p * (dp[i][j] - dt) * scale;
      }
    }
    __syncthreads();
    for (int c = 0; c < kB; ++c) {
      S pv[4], dsv[4], ov[kExactDims], qv[kExactDims];
#pragma unroll
      for (int i = 0; i < 4; ++i) pv[i] = Ps[(4 * a + i) * (kB + 1) + c], dsv[i] = Ds[(4 * a + i) * (kB + 1) + c];
#pragma unroll
      for (int e = 0; e < kExactDims; ++e) {
        ov[e] = b + 16 * e < D ? Os[c * P + b + 16 * e] : S(0);
        qv[e] = b + 16 * e < D ? Qs[c * P + b + 16 * e] : S(0);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int e = 0; e < kExactDims; ++e) {
          gv[i][e] += pv[i] * ov[e];
          gk[i][e] += dsv[i] * qv[e];
        }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t s = s0 + 4 * a + i;
    if (s < g.T)
#pragma unroll
      for (int e = 0; e < kExactDims; ++e)
        if (b + 16 * e < D) {
          const int64_t at = s * g.C + int64_t(h) * D + b + 16 * e;
          dk[at] += gk[i][e];
          dv[at] += gv[i][e];
        }
  }
}

// ---- fast path: bf16 tensor cores (float, D = 64, chunk a multiple of 64) --------------------------------

// Grid-stride float → bf16 (n a multiple of 4).
__global__ void to_bf16_kernel(const float* __restrict__ x, __nv_bfloat16* __restrict__ y, int64_t n) {
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4; i < n; i += int64_t(gridDim.x) * blockDim.x * 4) {
    const float4 f = *reinterpret_cast<const float4*>(x + i);
    *reinterpret_cast<uint2*>(y + i) = make_uint2(pack_bf16(f.x, f.y), pack_bf16(f.z, f.w));
  }
}

// lse2[h·Tp + t] = lse[t·H + h]·log2(e) for t < T, +inf up to Tp (p = 0 there).
__global__ void lse2_kernel(const float* __restrict__ lse, int64_t T, int H, int64_t Tp, float* __restrict__ lse2) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(H) * Tp) return;
  const int64_t h = i / Tp, t = i % Tp;
  lse2[i] = t < T ? lse[t * H + h] * 1.4426950408889634f : INFINITY;
}

// A fragments (16 rows × 64 dims, 4 k-steps) of fp32 rows row0 (lane row g) and row1 (g + 8) of x at column
// offset off; a null row is zero.
__device__ __forceinline__ void load_a_frags(uint32_t (&f)[4][4], const float* r0, const float* r1) {
  const int c = (threadIdx.x & 3) * 2;
#pragma unroll
  for (int ks = 0; ks < 4; ++ks)
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // a0a1: (g, c), a2a3: (g+8, c), a4a5: (g, c+8), a6a7: (g+8, c+8)
      const float* row = (i & 1) ? r1 : r0;
      const float2 v = row ? *reinterpret_cast<const float2*>(row + ks * 16 + (i >> 1) * 8 + c) : make_float2(0, 0);
      f[ks][i] = pack_bf16(v.x, v.y);
    }
}

// acc[nt] (16 × 64) += A (16 × 64, fragments) · Bᵀ where B is a shared [64][kPitch] tile whose rows are the n index
// (plain ldmatrix gives the B fragments): S = Q·Kᵀ, dP = dO·Vᵀ.
__device__ __forceinline__ void mma_abt(float (&acc)[8][4], const uint32_t (&a)[4][4], const __nv_bfloat16* B) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kp = 0; kp < 2; ++kp)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      uint32_t b[4];
      ldmatrix_x4(b, smem_addr(B + (nt * 8 + (lane & 7)) * kPitch + kp * 32 + (lane >> 3) * 8));
      mma_bf16(acc[nt], a[2 * kp], b[0], b[1]);
      mma_bf16(acc[nt], a[2 * kp + 1], b[2], b[3]);
    }
}

// mma_abt for kMT m-tiles of 16 rows (each B fragment loaded from shared memory feeds kMT products), and
// acc[mt][dt] += X[mt] · B where X holds 16 × 64 score-layout accumulators (rounded to bf16 A fragments) and B is a
// shared [64][kPitch] tile whose rows are the k index (ldmatrix.trans gives the B fragments): O = P·V, dq = dS·K.
template <int kMT>
__device__ __forceinline__ void mma_abt_m(float (&acc)[kMT][8][4], const uint32_t (&a)[kMT][4][4],
                                          const __nv_bfloat16* B) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kp = 0; kp < 2; ++kp)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      uint32_t b[4];
      ldmatrix_x4(b, smem_addr(B + (nt * 8 + (lane & 7)) * kPitch + kp * 32 + (lane >> 3) * 8));
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_bf16(acc[mt][nt], a[mt][2 * kp], b[0], b[1]);
        mma_bf16(acc[mt][nt], a[mt][2 * kp + 1], b[2], b[3]);
      }
    }
}
template <int kMT>
__device__ __forceinline__ void mma_xb_m(float (&acc)[kMT][8][4], const float (&x)[kMT][8][4],
                                         const __nv_bfloat16* B) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      a[mt][0] = pack_bf16(x[mt][2 * j][0], x[mt][2 * j][1]);
      a[mt][1] = pack_bf16(x[mt][2 * j][2], x[mt][2 * j][3]);
      a[mt][2] = pack_bf16(x[mt][2 * j + 1][0], x[mt][2 * j + 1][1]);
      a[mt][3] = pack_bf16(x[mt][2 * j + 1][2], x[mt][2 * j + 1][3]);
    }
#pragma unroll
    for (int dp = 0; dp < 4; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, smem_addr(B + (j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + dp * 16 +
                                     (lane >> 4) * 8));
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_bf16(acc[mt][2 * dp], a[mt], b[0], b[1]);
        mma_bf16(acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
      }
    }
  }
}
// 2^x, one MUFU instruction (flushes denormal results to 0; ex2(-inf) = 0).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// acc[dt] += X · B as mma_xb, X already packed to bf16 A fragments per 16-column step j.
__device__ __forceinline__ void mma_pb(float (&acc)[8][4], const uint32_t (&a)[4][4], const __nv_bfloat16* B) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int dp = 0; dp < 4; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, smem_addr(B + (j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + dp * 16 +
                                     (lane >> 4) * 8));
      mma_bf16(acc[2 * dp], a[j], b[0], b[1]);
      mma_bf16(acc[2 * dp + 1], a[j], b[2], b[3]);
    }
}
__device__ __forceinline__ float2 unpack_bf16(uint32_t u) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
}

__device__ __forceinline__ void zero(float (&x)[8][4]) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) x[nt][e] = 0.f;
}

// Copies 64 rows [r0, r0 + 64) (rows ≥ T zero) of head h of bf16 x ([T, C]) into a [64][kPitch] tile; 128 threads.
__device__ __forceinline__ void fetch_rows(__nv_bfloat16* dst, const __nv_bfloat16* __restrict__ x, int64_t r0,
                                           int64_t T, int64_t C, int h) {
#pragma unroll
  for (int k = 0; k < kB * (kB / 8) / (kFastWarps * 32); ++k) {
    const int idx = threadIdx.x + k * kFastWarps * 32, row = idx / (kB / 8), col = idx % (kB / 8) * 8;
    const bool in = r0 + row < T;
    cp_async16(dst + row * kPitch + col, x + (in ? r0 + row : 0) * C + int64_t(h) * kB + col, in);
  }
}

constexpr int kTileElems = kB * kPitch;  // bf16 elements of one tile
constexpr int kFastThreads = kFastWarps * 32;

__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool in) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(in ? 4 : 0));
}

// Runs body(i) for i < n with fetch(i) issued kStages − 1 tiles ahead (block-wide; fetch must commit exactly one
// cp.async group, empty past the end). Before body(i) every thread's copies of tile i have landed, and the stage
// of tile i − 1 is free (fetch(i + kStages − 1) refills it).
template <class Fetch, class Body>
__device__ __forceinline__ void pipeline(int n, Fetch fetch, Body body) {
  for (int i = 0; i < kStages - 1; ++i) fetch(i);
  for (int i = 0; i < n; ++i) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    fetch(i + kStages - 1);
    body(i);
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  __syncthreads();  // the stages may be reused
}

// ---- fast query-major attention: selected chunks (gathered queries) and own chunks ------------------------
// Modes: kFwd = forward (online softmax); kDelta = Σ p·dp per query (Δ = dout·o = Σ_s p_s dout·v_s); kDq =
// Σ p (dp − Δ) k (dq before the 1/√D). A warp owns kMT m-tiles of 16 rows; lane (g = lane/4, c = lane%4·2)
// holds rows g, g + 8 (rr = 0, 1) of each and score columns 8nt + c, +1 (the m16n8 accumulator layout).
constexpr int kFwd = 0, kDelta = 1, kDq = 2;


template <int kMode, int kMT>
struct QueryTiles {
  uint32_t qf[kMT][4][4], of[kMT][4][4];  // Q and (backward) dout A fragments
  float acc[kMT][8][4];                   // kFwd: o (unnormalised); kDq: dq
  float m[kMT][2];                        // kFwd: running max of the raw scores; else lse·log2(e)
  float l[kMT][2];                        // kFwd: Σ p (this lane's columns); kDelta: Σ p·dp (this lane's); kDq: Δ

  // Row pointers / values of m-tile mt, rows g and g + 8.
  __device__ void init(const float* const (&qrow)[kMT][2], const float* const (&orow)[kMT][2],
                       const float (&lse2)[kMT][2], const float (&dl)[kMT][2]) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      load_a_frags(qf[mt], qrow[mt][0], qrow[mt][1]);
      if constexpr (kMode != kFwd) load_a_frags(of[mt], orow[mt][0], orow[mt][1]);
      zero(acc[mt]);
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        m[mt][rr] = kMode == kFwd ? -INFINITY : lse2[mt][rr];
        l[mt][rr] = kMode == kDq ? dl[mt][rr] : 0.f;
      }
    }
  }

  // One 64-key tile; row (mt, rr) sees columns [0, lim[mt][rr]) unless full.
  __device__ void tile(const __nv_bfloat16* Ks, const __nv_bfloat16* Vs, const int (&lim)[kMT][2], bool full,
                       float sl2) {
    const int c = (threadIdx.x & 3) * 2;
    float s[kMT][8][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) zero(s[mt]);
    mma_abt_m<kMT>(s, qf, Ks);
    if constexpr (kMode == kFwd) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        float mx[2] = {m[mt][0], m[mt][1]};
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (!full && nt * 8 + c + (e & 1) >= lim[mt][e >> 1]) s[mt][nt][e] = -INFINITY;
            mx[e >> 1] = fmaxf(mx[e >> 1], s[mt][nt][e]);
          }
        float base[2], corr[2];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 1));
          mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 2));
          base[rr] = mx[rr] == -INFINITY ? 0.f : mx[rr] * sl2;  // nothing visible yet: p = 0
          corr[rr] = ex2(m[mt][rr] * sl2 - base[rr]);
          m[mt][rr] = mx[rr];
          l[mt][rr] *= corr[rr];
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][nt][e] = ex2(fmaf(s[mt][nt][e], sl2, -base[e >> 1]));
            l[mt][e >> 1] += s[mt][nt][e];
            acc[mt][nt][e] *= corr[e >> 1];
          }
      }
      mma_xb_m<kMT>(acc, s, Vs);
    } else {
      float dp[kMT][8][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) zero(dp[mt]);
      mma_abt_m<kMT>(dp, of, Vs);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float p = (!full && nt * 8 + c + (e & 1) >= lim[mt][e >> 1])
                                ? 0.f
                                : ex2(fmaf(s[mt][nt][e], sl2, -m[mt][e >> 1]));
            if constexpr (kMode == kDelta) l[mt][e >> 1] += p * dp[mt][nt][e];
            else s[mt][nt][e] = p * (dp[mt][nt][e] - l[mt][e >> 1]);
          }
      if constexpr (kMode == kDq) mma_xb_m<kMT>(acc, s, Ks);
    }
  }

  // Sums the per-lane l over the quad (kFwd, kDelta).
  __device__ void finish() {
    if constexpr (kMode != kDq)
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          l[mt][rr] += __shfl_xor_sync(0xffffffffu, l[mt][rr], 1);
          l[mt][rr] += __shfl_xor_sync(0xffffffffu, l[mt][rr], 2);
        }
  }
};

// Pair buckets: the (query, selected chunk) pairs of head h and chunk n, ascending in the query, as pair ids
// e = (t·H + h)·K1 + slot (slot: the chunk's index in the query's selection). Built from the mask words by
// bucket_scan_kernel, bucket_prefix_kernel and bucket_fill_kernel.
struct Buckets {
  const int* cnt;     // [H·nch] pairs per bucket
  const int* start;   // [H·nch + 1] first pair of each bucket in list
  const int* gstart;  // [H·nch + 1] first group (of the selected-chunk kernels' size) of each bucket
  const int* list;    // pair ids
  const int* qlist;   // the query of each pair (list / (H·K1))
  int K1;
};

// Block-wide exclusive scan of one int per thread (blockDim a multiple of 32, ≤ 1024); total to all.
__device__ __forceinline__ int block_scan(int v, int* scratch, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  int off = 0;
  total = 0;
  for (int w = 0; w < nw; ++w) {
    if (w < warp) off += scratch[w];
    total += scratch[w];
  }
  __syncthreads();
  return off + x - v;
}

// Grid H·nch, 256 threads: for bucket (h, n), off[(h·nch + n)·nqb + qb] = pairs of the bucket in query blocks
// before qb (query blocks of later chunks only: the own chunk's bits are not pairs), cnt = all of them.
__global__ void bucket_scan_kernel(const unsigned long long* __restrict__ mask, int64_t chunk, int64_t nch,
                                   int64_t nqb, int* __restrict__ off, int* __restrict__ cnt) {
  __shared__ int scratch[32];
  const int64_t b = blockIdx.x, n = b % nch;
  const int64_t qb0 = (n + 1) * chunk / kB;
  int running = 0;
  for (int64_t base = qb0; base < nqb; base += blockDim.x) {
    const int64_t qb = base + threadIdx.x;
    const int c = qb < nqb ? __popcll(mask[b * nqb + qb]) : 0;
    int total;
    const int ex = block_scan(c, scratch, total);
    if (qb < nqb) off[b * nqb + qb] = running + ex;
    running += total;
  }
  if (threadIdx.x == 0) cnt[b] = running;
}

// One block of 1024 threads: start and gstart as exclusive scans of cnt and ⌈cnt/group⌉ (nb + 1 entries).
__global__ void bucket_prefix_kernel(const int* __restrict__ cnt, int64_t nb, int group, int* __restrict__ start,
                                     int* __restrict__ gstart) {
  __shared__ int scratch[32];
  int run_p = 0, run_g = 0;
  for (int64_t base = 0; base < nb; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const int c = i < nb ? cnt[i] : 0;
    int tp, tg;
    const int ep = block_scan(c, scratch, tp);
    const int eg = block_scan((c + group - 1) / group, scratch, tg);
    if (i < nb) start[i] = run_p + ep, gstart[i] = run_g + eg;
    run_p += tp, run_g += tg;
  }
  if (threadIdx.x == 0) start[nb] = run_p, gstart[nb] = run_g;
}

// Grid (query blocks, H), 64 threads: each query's pairs into their buckets' lists.
__global__ void bucket_fill_kernel(const int32_t* __restrict__ sel, const unsigned long long* __restrict__ mask,
                                   const int* __restrict__ off, const int* __restrict__ start, int64_t T, int H,
                                   int K1, int64_t nch, int64_t nqb, int* __restrict__ list, int* __restrict__ qlist) {
  const int h = blockIdx.y, r = threadIdx.x;
  const int64_t qb = blockIdx.x, t = qb * kB + r;
  if (t >= T) return;
  for (int i = 0; i < K1; ++i) {
    const int s = sel[(t * H + h) * K1 + i];
    if (s < 0) continue;
    const int64_t b = int64_t(h) * nch + s;
    const unsigned long long below = mask[b * nqb + qb] & ((1ull << r) - 1);
    const int64_t at = start[b] + off[b * nqb + qb] + __popcll(below);
    list[at] = int((t * H + h) * K1 + i);
    qlist[at] = int(t);
  }
}

// The bucket of group blk: the last i with gstart[i] ≤ blk (blk < gstart[nb]).
__device__ __forceinline__ int64_t find_bucket(const int* gstart, int64_t nb, int64_t blk) {
  int64_t lo = 0, hi = nb - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (gstart[mid] <= blk) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Partial results per pair e (buffers indexed by pair id): o (normalised) and lse (kFwd); Σ p·dp (kDelta);
// dq before 1/√D (kDq).
struct Partials {
  float* o;    // [pairs][64]: kFwd o, kDq dq
  float* val;  // [pairs]: kFwd lse, kDelta Σ p·dp
};

struct FastArgs {
  Geometry g;
  const float* q;
  const float* dout;
  const __nv_bfloat16* kh;
  const __nv_bfloat16* vh;
  const float* lse2;   // [H][Tp] lse·log2(e) (backward)
  const float* delta;  // [H][Tp] Δ (kDq)
  float scale;
};

// Grid ≥ groups, 128 threads: kGroup = 64·kMT pairs of one bucket (h, n) against the keys of chunk n, all visible
// (warp w: rows 16·kMT·w + 16·mt + g, + 8). Writes each pair's partial.
template <int kMode, int kMT>
__global__ void __launch_bounds__(kFastThreads) fast_selected_kernel(FastArgs a, Buckets bk, Partials part) {
  constexpr int kGroup = 16 * kMT * kFastWarps;
  extern __shared__ __align__(16) unsigned char smem[];
  auto* stages = reinterpret_cast<__nv_bfloat16*>(smem);
  const Geometry& g = a.g;
  const int64_t nb = int64_t(g.H) * g.nch, blk = blockIdx.x;
  if (blk >= bk.gstart[nb]) return;
  const int64_t bucket = find_bucket(bk.gstart, nb, blk), n = bucket % g.nch;
  const int h = int(bucket / g.nch);
  const int g0 = int(blk - bk.gstart[bucket]) * kGroup, rows = min(kGroup, bk.cnt[bucket] - g0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, c = (lane & 3) * 2;
  const int HK = g.H * bk.K1;
  int e[kMT][2];
  const float *qrow[kMT][2], *orow[kMT][2];
  float lse2[kMT][2], dl[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = warp * 16 * kMT + mt * 16 + lane / 4 + rr * 8;
      e[mt][rr] = r < rows ? bk.list[bk.start[bucket] + g0 + r] : -1;
      const int64_t t = e[mt][rr] >= 0 ? e[mt][rr] / HK : -1;
      qrow[mt][rr] = t >= 0 ? a.q + t * g.C + int64_t(h) * kB : nullptr;
      orow[mt][rr] = t >= 0 && kMode != kFwd ? a.dout + t * g.C + int64_t(h) * kB : nullptr;
      lse2[mt][rr] = t >= 0 && kMode != kFwd ? a.lse2[int64_t(h) * g.Tp + t] : 0.f;
      dl[mt][rr] = t >= 0 && kMode == kDq ? a.delta[int64_t(h) * g.Tp + t] : 0.f;
    }
  QueryTiles<kMode, kMT> st;
  st.init(qrow, orow, lse2, dl);
  const float sl2 = a.scale * 1.4426950408889634f;
  const int64_t key0 = n * g.chunk;
  int lim[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) lim[mt][0] = lim[mt][1] = kB;
  pipeline(
      int(g.chunk / kB),
      [&](int i) {
        if (i < int(g.chunk / kB)) {
          __nv_bfloat16* s = stages + (i % kStages) * 2 * kTileElems;
          fetch_rows(s, a.kh, key0 + int64_t(i) * kB, g.T, g.C, h);
          fetch_rows(s + kTileElems, a.vh, key0 + int64_t(i) * kB, g.T, g.C, h);
        }
        cp_async_commit();
      },
      [&](int i) {
        const __nv_bfloat16* s = stages + (i % kStages) * 2 * kTileElems;
        st.tile(s, s + kTileElems, lim, true, sl2);
      });
  st.finish();
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int ee = e[mt][rr];
      if (ee < 0) continue;
      if constexpr (kMode == kFwd) {
        const float inv = 1.f / st.l[mt][rr];
        float* dst = part.o + int64_t(ee) * kB + c;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          *reinterpret_cast<float2*>(dst + nt * 8) =
              make_float2(st.acc[mt][nt][2 * rr] * inv, st.acc[mt][nt][2 * rr + 1] * inv);
        if ((lane & 3) == 0) part.val[ee] = st.m[mt][rr] * a.scale + logf(st.l[mt][rr]);
      } else if constexpr (kMode == kDelta) {
        if ((lane & 3) == 0) part.val[ee] = st.l[mt][rr];
      } else {
        float* dst = part.o + int64_t(ee) * kB + c;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          *reinterpret_cast<float2*>(dst + nt * 8) = make_float2(st.acc[mt][nt][2 * rr], st.acc[mt][nt][2 * rr + 1]);
      }
    }
}

// Grid (blocks of 64·kMT queries, H), 128 threads: the queries against their own chunk (causal; the block lies in
// one chunk: chunk % (64·kMT) == 0), then merged with the pairs' partials in slot order. kFwd: out, lse. kDelta:
// Δ into delta ([H][Tp]). kDq: dq += (own + partials)/√D. Warp w: rows 16·kMT·w + 16·mt + g, + 8.
template <int kMode, int kMT>
__global__ void __launch_bounds__(kFastThreads) fast_own_kernel(FastArgs a, const int32_t* __restrict__ sel, int K1,
                                                                Partials part, float* __restrict__ out,
                                                                float* __restrict__ lse, float* __restrict__ delta,
                                                                float* __restrict__ dq) {
  constexpr int kRows = kB * kMT;
  extern __shared__ __align__(16) unsigned char smem[];
  auto* stages = reinterpret_cast<__nv_bfloat16*>(smem);
  const Geometry& g = a.g;
  const int h = blockIdx.y;
  const int64_t blk = int64_t(gridDim.x) - 1 - blockIdx.x;  // the longest own-chunk blocks first
  const int64_t t0 = blk * kRows, kb0 = t0 / g.chunk * g.chunk / kB;
  const int64_t t_last = (t0 + kRows < g.T ? t0 + kRows : g.T) - 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, c = (lane & 3) * 2;
  int64_t trow[kMT][2];
  const float *qrow[kMT][2], *orow[kMT][2];
  float lse2[kMT][2], dl[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t t = t0 + warp * 16 * kMT + mt * 16 + lane / 4 + rr * 8;
      trow[mt][rr] = t;
      const bool in = t < g.T;
      qrow[mt][rr] = in ? a.q + t * g.C + int64_t(h) * kB : nullptr;
      orow[mt][rr] = in && kMode != kFwd ? a.dout + t * g.C + int64_t(h) * kB : nullptr;
      lse2[mt][rr] = in && kMode != kFwd ? a.lse2[int64_t(h) * g.Tp + t] : 0.f;
      dl[mt][rr] = in && kMode == kDq ? a.delta[int64_t(h) * g.Tp + t] : 0.f;
    }
  QueryTiles<kMode, kMT> st;
  st.init(qrow, orow, lse2, dl);
  const float sl2 = a.scale * 1.4426950408889634f;
  const int nk = int(t_last / kB - kb0 + 1);
  pipeline(
      nk,
      [&](int i) {
        if (i < nk) {
          __nv_bfloat16* s = stages + (i % kStages) * 2 * kTileElems;
          fetch_rows(s, a.kh, (kb0 + i) * kB, g.T, g.C, h);
          fetch_rows(s + kTileElems, a.vh, (kb0 + i) * kB, g.T, g.C, h);
        }
        cp_async_commit();
      },
      [&](int i) {
        const __nv_bfloat16* s = stages + (i % kStages) * 2 * kTileElems;
        const int64_t s0 = (kb0 + i) * kB;
        int lim[kMT][2];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            const int64_t cl = trow[mt][rr] < g.T ? trow[mt][rr] - s0 + 1 : 0;
            lim[mt][rr] = int(cl < 0 ? 0 : cl > kB ? kB : cl);
          }
        st.tile(s, s + kTileElems, lim, s0 + kB <= t0 + 1, sl2);  // tiles reaching the block's queries are masked
      });
  st.finish();
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t t = trow[mt][rr];
      if (t >= g.T) continue;
      const int32_t* ts = sel + (t * g.H + h) * K1;
      const int64_t e0 = (t * g.H + h) * K1;
      if constexpr (kMode == kFwd) {
        // Merge (lse, o) of the own chunk and of each selected chunk: one softmax over their union.
        const float lo = st.m[mt][rr] * a.scale + logf(st.l[mt][rr]);
        float M = lo;
        for (int i = 0; i < K1; ++i)
          if (ts[i] >= 0) M = fmaxf(M, part.val[e0 + i]);
        const float wo = expf(lo - M), inv_l = 1.f / st.l[mt][rr];
        float sum = wo, o[8][2];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          o[nt][0] = wo * st.acc[mt][nt][2 * rr] * inv_l, o[nt][1] = wo * st.acc[mt][nt][2 * rr + 1] * inv_l;
        for (int i = 0; i < K1; ++i) {
          if (ts[i] < 0) continue;
          const float w = expf(part.val[e0 + i] - M);
          sum += w;
          const float* po = part.o + (e0 + i) * kB + c;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            const float2 x = *reinterpret_cast<const float2*>(po + nt * 8);
            o[nt][0] += w * x.x, o[nt][1] += w * x.y;
          }
        }
        const float inv = 1.f / sum;
        float* dst = out + t * g.C + int64_t(h) * kB + c;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          *reinterpret_cast<float2*>(dst + nt * 8) = make_float2(o[nt][0] * inv, o[nt][1] * inv);
        if ((lane & 3) == 0) lse[t * g.H + h] = M + logf(sum);
      } else if constexpr (kMode == kDelta) {
        float d = st.l[mt][rr];
        for (int i = 0; i < K1; ++i)
          if (ts[i] >= 0) d += part.val[e0 + i];
        if ((lane & 3) == 0) delta[int64_t(h) * g.Tp + t] = d;
      } else {
        float o[8][2];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) o[nt][0] = st.acc[mt][nt][2 * rr], o[nt][1] = st.acc[mt][nt][2 * rr + 1];
        for (int i = 0; i < K1; ++i) {
          if (ts[i] < 0) continue;
          const float* po = part.o + (e0 + i) * kB + c;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            const float2 x = *reinterpret_cast<const float2*>(po + nt * 8);
            o[nt][0] += x.x, o[nt][1] += x.y;
          }
        }
        float* dst = dq + t * g.C + int64_t(h) * kB + c;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          float2 x = *reinterpret_cast<float2*>(dst + nt * 8);
          x.x += o[nt][0] * a.scale, x.y += o[nt][1] * a.scale;
          *reinterpret_cast<float2*>(dst + nt * 8) = x;
        }
      }
    }
}

// Grid (key blocks, H), 128 threads: dk, dv of 64 keys of chunk n. Query tiles in order: the own chunk's query
// blocks from the key block on (causal), then the bucket (h, n) in groups of 64 pairs (ascending queries). Warp
// w owns key rows 16w..; lane holds keys g, g + 8 and query columns 8nt + c, +1 of the transposed score tile.
// K and V of the block stay in registers as A fragments.
constexpr size_t kKeyStageBytes = 2 * kTileElems * 2 + 3 * kB * 4;  // Q, dO, lse2, Δ, rows

__global__ void __launch_bounds__(kFastThreads, 3) fast_key_kernel(FastArgs a, const float* __restrict__ k,
                                                                const float* __restrict__ v,
                                                                const __nv_bfloat16* __restrict__ qh,
                                                                const __nv_bfloat16* __restrict__ oh, Buckets bk,
                                                                float* __restrict__ dk, float* __restrict__ dv) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Geometry& g = a.g;
  const int h = blockIdx.y;
  const int64_t kb = blockIdx.x, s0 = kb * kB, n = s0 / g.chunk;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, c = (lane & 3) * 2;
  const int64_t qb_end = std::min<int64_t>(g.nqb, (n + 1) * g.chunk / kB);
  const int n_own = int(qb_end - kb);
  const int64_t bucket = int64_t(h) * g.nch + n;
  const int n_pairs = bk.K1 > 0 && n < g.T / g.chunk ? bk.cnt[bucket] : 0;  // only complete chunks are selected
  const int n_groups = (n_pairs + kB - 1) / kB;
  const int* qlist = bk.qlist + (n_pairs ? bk.start[bucket] : 0);
  int64_t srow[2];
  bool kin[2];
  const float *krow[2], *vrow[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    srow[rr] = s0 + warp * 16 + lane / 4 + rr * 8;
    kin[rr] = srow[rr] < g.T;
    krow[rr] = kin[rr] ? k + srow[rr] * g.C + int64_t(h) * kB : nullptr;
    vrow[rr] = kin[rr] ? v + srow[rr] * g.C + int64_t(h) * kB : nullptr;
  }
  uint32_t kf[4][4], vf[4][4];
  load_a_frags(kf, krow[0], krow[1]);
  load_a_frags(vf, vrow[0], vrow[1]);
  const float sl2 = a.scale * 1.4426950408889634f;
  float gk[8][4], gv[8][4];
  zero(gk);
  zero(gv);
  const int n_tiles = n_own + n_groups;
  // Gathered tiles: thread r < 64 reads the query of column r from the bucket's query list one gathered tile
  // ahead (nxt), so the load's latency hides behind a tile of work; at the fetch it goes to shared memory.
  int nxt = -1;
  auto pair_row = [&](int gi) {
    const int r = int(threadIdx.x), p = gi * kB + r;
    if (r < kB) nxt = gi < n_groups && p < n_pairs ? qlist[p] : -1;
  };
  pair_row(0);
  pipeline(
      n_tiles,
      [&](int i) {
        if (i < n_tiles) {
          unsigned char* st = smem + (i % kStages) * kKeyStageBytes;
          auto* Qs = reinterpret_cast<__nv_bfloat16*>(st);
          auto* vec = reinterpret_cast<float*>(st + 2 * kTileElems * 2);  // lse2[64], Δ[64]
          if (i < n_own) {
            const int64_t t0 = (kb + i) * kB;
            fetch_rows(Qs, qh, t0, g.T, g.C, h);
            fetch_rows(Qs + kTileElems, oh, t0, g.T, g.C, h);
            if (threadIdx.x < 32) {
              const int piece = (threadIdx.x & 15) * 4, which = threadIdx.x >> 4;
              cp_async16(vec + which * kB + piece, (which ? a.delta : a.lse2) + int64_t(h) * g.Tp + t0 + piece, true);
            }
          } else {
            int* rows = reinterpret_cast<int*>(vec + 2 * kB);  // the query of each column, −1: none
            if (threadIdx.x < kB) rows[threadIdx.x] = nxt;
            pair_row(i - n_own + 1);
            __syncthreads();
            const int col = (threadIdx.x & 7) * 8;
#pragma unroll
            for (int k2 = 0; k2 < 4; ++k2) {
              const int row = int(threadIdx.x >> 3) + 16 * k2, t = rows[row];
              const int64_t at = int64_t(t >= 0 ? t : 0) * g.C + int64_t(h) * kB + col;
              cp_async16(Qs + row * kPitch + col, qh + at, t >= 0);
              cp_async16(Qs + kTileElems + row * kPitch + col, oh + at, t >= 0);
            }
            const int t = rows[threadIdx.x & (kB - 1)];
            cp_async4(vec + (threadIdx.x >> 6) * kB + (threadIdx.x & (kB - 1)),
                      (threadIdx.x >> 6 ? a.delta : a.lse2) + int64_t(h) * g.Tp + (t >= 0 ? t : 0), t >= 0);
          }
        }
        cp_async_commit();
      },
      [&](int i) {
        const unsigned char* st = smem + (i % kStages) * kKeyStageBytes;
        const auto* Qs = reinterpret_cast<const __nv_bfloat16*>(st);
        const auto* Os = Qs + kTileElems;
        const auto* lse_s = reinterpret_cast<const float*>(st + 2 * kTileElems * 2);
        const float* del_s = lse_s + kB;
        // Only the key block's own query block (tile 0) needs the causal mask: later own blocks and selected
        // pairs see every key. Columns past T or padding pairs have zero Q and dout rows: their p is harmless
        // (lse·log2(e) is +inf past T, so p = 0 there).
        const bool diag = i == 0;
        const int64_t t0 = (kb + i) * kB;
        float s[8][4];
        zero(s);
        mma_abt(s, kf, Qs);
        uint32_t pa[4][4];  // Pᵀ rounded to bf16 A fragments (keys × queries)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = nt * 8 + c + (e & 1);
            float p = ex2(fmaf(s[nt][e], sl2, -lse_s[col]));
            if (diag && t0 + col < srow[e >> 1]) p = 0.f;
            s[nt][e] = p;
          }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          pa[j][0] = pack_bf16(s[2 * j][0], s[2 * j][1]);
          pa[j][1] = pack_bf16(s[2 * j][2], s[2 * j][3]);
          pa[j][2] = pack_bf16(s[2 * j + 1][0], s[2 * j + 1][1]);
          pa[j][3] = pack_bf16(s[2 * j + 1][2], s[2 * j + 1][3]);
        }
        mma_pb(gv, pa, Os);
        float dp[8][4];
        zero(dp);
        mma_abt(dp, vf, Os);
        // dsᵀ = p (dp − Δ), p from its bf16 rounding (the operand precision of the products anyway).
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int h2 = 0; h2 < 4; ++h2) {
            const int nt = 2 * j + (h2 >> 1), e0 = (h2 & 1) * 2, col = nt * 8 + c;
            const float2 p = unpack_bf16(pa[j][h2]);
            pa[j][h2] = pack_bf16(p.x * (dp[nt][e0] - del_s[col]), p.y * (dp[nt][e0 + 1] - del_s[col + 1]));
          }
        mma_pb(gk, pa, Qs);
      });
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    if (!kin[rr]) continue;
    const int64_t at = srow[rr] * g.C + int64_t(h) * kB + c;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      float2 x = *reinterpret_cast<float2*>(dk + at + nt * 8);
      x.x += gk[nt][2 * rr] * a.scale;
      x.y += gk[nt][2 * rr + 1] * a.scale;
      *reinterpret_cast<float2*>(dk + at + nt * 8) = x;
      float2 y = *reinterpret_cast<float2*>(dv + at + nt * 8);
      y.x += gv[nt][2 * rr];
      y.y += gv[nt][2 * rr + 1];
      *reinterpret_cast<float2*>(dv + at + nt * 8) = y;
    }
  }
}

// ---- host side ---------------------------------------------------------------------------------------

template <class S>
bool use_fast(int64_t C, int64_t D, int64_t chunk) {
  if constexpr (!std::is_same_v<S, float>) {
    return false;
  } else {
    int mode = g_exact_mode;
    if (mode < 0) {
      const char* env = std::getenv("RWKVX_CUDA_TRAIN_EXACT_ATTN");
      mode = env && *env && std::strcmp(env, "0") != 0 ? 1 : 0;
    }
    return mode == 0 && D == kB && chunk % kB == 0 && C % kB == 0;
  }
}

// Stream-ordered scratch, freed on the stream when it goes out of scope.
struct Scratch {
  cudaStream_t st;
  void* p = nullptr;
  Scratch(cudaStream_t s, size_t bytes) : st(s) {
    if (bytes) MOBA_CHECK(cudaMallocAsync(&p, bytes, st));
  }
  ~Scratch() {
    if (p) cudaFreeAsync(p, st);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class X>
  X* as() const {
    return static_cast<X*>(p);
  }
};

Geometry geometry(int64_t T, int64_t C, int64_t D, int64_t chunk) {
  Geometry g{};
  g.T = T, g.C = C, g.chunk = chunk, g.D = int(D), g.H = int(C / D);
  g.nch = (T + chunk - 1) / chunk;
  g.nqb = (T + kB - 1) / kB;
  g.Tp = g.nqb * kB;
  return g;
}

void check_shape(int64_t T, int64_t C, int64_t D, int64_t chunk, int64_t top_k) {
  RWKVX_ASSERT(D > 0 && C % D == 0 && chunk > 0 && top_k >= 1, "moba (CUDA): bad shape");
  RWKVX_ASSERT(D <= 64, "moba (CUDA): head size above 64 is not supported");
  RWKVX_ASSERT(T < (int64_t(1) << 31) && top_k - 1 <= 64, "moba (CUDA): sequence or top_k too large");
}

// Attention masks from `selected` (stream-ordered; mask must hold H·nch·nqb words).
void build_masks(cudaStream_t st, const Geometry& g, const int32_t* sel, int K1, unsigned long long* mask) {
  MOBA_CHECK(cudaMemsetAsync(mask, 0, size_t(g.H) * g.nch * g.nqb * 8, st));
  mask_kernel<<<dim3(unsigned(g.nqb), unsigned(g.H)), kB, 0, st>>>(K1 > 0 ? sel : nullptr, g.T, g.H, g.chunk, K1,
                                                                   g.nch, g.nqb, mask);
  MOBA_LAUNCHED();
}

void to_bf16(cudaStream_t st, const float* x, __nv_bfloat16* y, int64_t n) {
  const int64_t blocks = std::min<int64_t>((n / 4 + 255) / 256, 132 * 16);
  to_bf16_kernel<<<unsigned(blocks > 0 ? blocks : 1), 256, 0, st>>>(x, y, n);
  MOBA_LAUNCHED();
}

void set_smem(const void* kernel, size_t smem) {
  if (smem > 48 * 1024)
    MOBA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}

// The pair buckets of the fast path (stream-ordered scratch owned by the caller's scope).
struct BucketScratch {
  Scratch off, cnt, start, gstart, list, qlist;
  Buckets view;
  int64_t max_groups = 0;
  BucketScratch(cudaStream_t st, const Geometry& g, const int32_t* sel, int K1, const unsigned long long* mask,
                int group)
      : off(st, K1 > 0 ? size_t(g.H) * g.nch * g.nqb * 4 : 0),
        cnt(st, K1 > 0 ? size_t(g.H) * g.nch * 4 : 0),
        start(st, K1 > 0 ? size_t(g.H * g.nch + 1) * 4 : 0),
        gstart(st, K1 > 0 ? size_t(g.H * g.nch + 1) * 4 : 0),
        list(st, K1 > 0 ? size_t(g.T) * g.H * K1 * 4 : 0),
        qlist(st, K1 > 0 ? size_t(g.T) * g.H * K1 * 4 : 0) {
    view = {cnt.as<int>(), start.as<int>(), gstart.as<int>(), list.as<int>(), qlist.as<int>(), K1};
    if (K1 <= 0) return;
    const int64_t nb = int64_t(g.H) * g.nch;
    bucket_scan_kernel<<<unsigned(nb), 256, 0, st>>>(mask, g.chunk, g.nch, g.nqb, off.as<int>(), cnt.as<int>());
    MOBA_LAUNCHED();
    bucket_prefix_kernel<<<1, 1024, 0, st>>>(cnt.as<int>(), nb, group, start.as<int>(), gstart.as<int>());
    MOBA_LAUNCHED();
    bucket_fill_kernel<<<dim3(unsigned(g.nqb), unsigned(g.H)), kB, 0, st>>>(sel, mask, off.as<int>(), start.as<int>(),
                                                                             g.T, g.H, K1, g.nch, g.nqb, list.as<int>(),
                                                                             qlist.as<int>());
    MOBA_LAUNCHED();
    max_groups = (g.T * g.H * K1 + group - 1) / group + nb;
  }
};

constexpr size_t kQuerySmem = size_t(kStages) * 2 * kTileElems * 2;

// m-tiles per warp of the selected-chunk kernels (1 or 2): 2 measured faster at T = 65536 (each K/V fragment
// feeds two products), forward 5.7 → 4.5 ms, backward 17.5 → 16.0 ms on an H100.
constexpr int kSelMT = 2;

// Own-chunk kernel: two m-tiles per warp (128 queries a block) where the chunk allows, except for dq (its
// registers spill with two).
template <int kMode>
void launch_own(cudaStream_t st, const Geometry& g, const FastArgs& a, const int32_t* sel, int K1, const Partials& p,
                float* out, float* lse, float* delta, float* dq) {
  if (kMode != kDq && g.chunk % (2 * kB) == 0) {
    set_smem(reinterpret_cast<const void*>(fast_own_kernel<kMode, 2>), kQuerySmem);
    fast_own_kernel<kMode, 2><<<dim3(unsigned((g.T + 2 * kB - 1) / (2 * kB)), unsigned(g.H)), kFastThreads, kQuerySmem,
                                st>>>(a, sel, K1, p, out, lse, delta, dq);
  } else {
    set_smem(reinterpret_cast<const void*>(fast_own_kernel<kMode, 1>), kQuerySmem);
    fast_own_kernel<kMode, 1><<<dim3(unsigned(g.nqb), unsigned(g.H)), kFastThreads, kQuerySmem, st>>>(
        a, sel, K1, p, out, lse, delta, dq);
  }
  MOBA_LAUNCHED();
}

template <int kMode>
void launch_selected(cudaStream_t st, int mt, int64_t groups, const FastArgs& a, const Buckets& b, const Partials& p) {
  if (mt == 2) {
    set_smem(reinterpret_cast<const void*>(fast_selected_kernel<kMode, 2>), kQuerySmem);
    fast_selected_kernel<kMode, 2><<<unsigned(groups), kFastThreads, kQuerySmem, st>>>(a, b, p);
  } else {
    set_smem(reinterpret_cast<const void*>(fast_selected_kernel<kMode, 1>), kQuerySmem);
    fast_selected_kernel<kMode, 1><<<unsigned(groups), kFastThreads, kQuerySmem, st>>>(a, b, p);
  }
  MOBA_LAUNCHED();
}
constexpr size_t kKeySmem = size_t(kStages) * kKeyStageBytes;

void fast_forward(cudaStream_t st, const Geometry& g, const float* q, const float* k, const float* v, float* out,
                  const int32_t* sel, float* lse, int K1, const unsigned long long* mask, float scale) {
  const int64_t TC = g.T * g.C;
  Scratch kv(st, size_t(TC) * 2 * sizeof(__nv_bfloat16));
  auto* kh = kv.as<__nv_bfloat16>();
  auto* vh = kh + TC;
  to_bf16(st, k, kh, TC);
  to_bf16(st, v, vh, TC);
  const int mt = kSelMT;
  BucketScratch bk(st, g, sel, K1, mask, 64 * mt);
  Scratch po(st, size_t(g.T) * g.H * std::max(K1, 0) * kB * 4), pv(st, size_t(g.T) * g.H * std::max(K1, 0) * 4);
  const Partials part{po.as<float>(), pv.as<float>()};
  const FastArgs a{g, q, nullptr, kh, vh, nullptr, nullptr, scale};
  if (K1 > 0) launch_selected<kFwd>(st, mt, bk.max_groups, a, bk.view, part);
  launch_own<kFwd>(st, g, a, sel, K1, part, out, lse, nullptr, nullptr);
}

void fast_backward(cudaStream_t st, const Geometry& g, const float* dout, const float* q, const float* k,
                   const float* v, const int32_t* sel, const float* lse, float* dq, float* dk, float* dv, int K1,
                   const unsigned long long* mask, float scale) {
  const int64_t TC = g.T * g.C;
  Scratch bf(st, size_t(TC) * 4 * sizeof(__nv_bfloat16));
  auto* qh = bf.as<__nv_bfloat16>();
  auto* kh = qh + TC;
  auto* vh = kh + TC;
  auto* oh = vh + TC;
  to_bf16(st, q, qh, TC);
  to_bf16(st, k, kh, TC);
  to_bf16(st, v, vh, TC);
  to_bf16(st, dout, oh, TC);
  Scratch vecs(st, size_t(2) * g.H * g.Tp * sizeof(float));  // lse·log2(e), Δ: [H][Tp], zero past T
  float* lse2 = vecs.as<float>();
  float* dlt = lse2 + g.H * g.Tp;
  MOBA_CHECK(cudaMemsetAsync(dlt, 0, size_t(g.H) * g.Tp * sizeof(float), st));
  lse2_kernel<<<unsigned((g.H * g.Tp + 255) / 256), 256, 0, st>>>(lse, g.T, g.H, g.Tp, lse2);
  MOBA_LAUNCHED();
  const int mt = kSelMT;
  BucketScratch bk(st, g, sel, K1, mask, 64 * mt);
  Scratch po(st, size_t(g.T) * g.H * std::max(K1, 0) * kB * 4), pv(st, size_t(g.T) * g.H * std::max(K1, 0) * 4);
  const Partials part{po.as<float>(), pv.as<float>()};
  const FastArgs a{g, q, dout, kh, vh, lse2, dlt, scale};
  const dim3 grid(unsigned(g.nqb), unsigned(g.H));
  // Δ = Σ p·dp over the selected chunks (partials) and the own chunk.
  if (K1 > 0) launch_selected<kDelta>(st, mt, bk.max_groups, a, bk.view, part);
  launch_own<kDelta>(st, g, a, sel, K1, part, nullptr, nullptr, dlt, nullptr);
  // dq.
  if (K1 > 0) launch_selected<kDq>(st, mt, bk.max_groups, a, bk.view, part);
  launch_own<kDq>(st, g, a, sel, K1, part, nullptr, nullptr, nullptr, dq);
  // dk, dv.
  set_smem(reinterpret_cast<const void*>(fast_key_kernel), kKeySmem);
  fast_key_kernel<<<grid, kFastThreads, kKeySmem, st>>>(a, k, v, qh, oh, bk.view, dk, dv);
  MOBA_LAUNCHED();
}

}  // namespace

void set_moba_exact_attention(int mode) { g_exact_mode = mode; }

template <class S>
void moba_forward(cudaStream_t st, const S* q, const S* k, const S* v, S* out, int32_t* selected, S* lse, int64_t T,
                  int64_t C, int64_t D, int64_t chunk, int64_t top_k) {
  check_shape(T, C, D, chunk, top_k);
  if (T == 0) return;
  const Geometry g = geometry(T, C, D, chunk);
  const int K1 = int(top_k - 1);
  const int64_t n_full = T / chunk;
  if (K1 > 0) {
    Scratch mean(st, size_t(n_full * C) * sizeof(S));
    if (n_full > 0) {
      chunk_mean_kernel<S><<<dim3(unsigned(n_full), unsigned((C + 127) / 128)), 128, 0, st>>>(k, C, chunk,
                                                                                                mean.as<S>());
      MOBA_LAUNCHED();
    }
    const size_t smem = gate_smem_bytes(int(D), K1, sizeof(S));
    set_smem(reinterpret_cast<const void*>(gate_kernel<S>), smem);
    gate_kernel<S><<<dim3(unsigned((T + kGateThreads - 1) / kGateThreads), unsigned(g.H)), kGateThreads, smem, st>>>(
        q, mean.as<S>(), T, C, g.D, g.H, chunk, K1, selected);
    MOBA_LAUNCHED();
  }
  Scratch mask(st, size_t(g.H) * g.nch * g.nqb * 8);
  build_masks(st, g, selected, K1, mask.as<unsigned long long>());
  const S scale = S(1.0 / std::sqrt(double(D)));
  const dim3 grid(unsigned(g.nqb), unsigned(g.H));
  if (use_fast<S>(C, D, chunk)) {
    if constexpr (std::is_same_v<S, float>)
      fast_forward(st, g, q, k, v, out, selected, lse, K1, mask.as<unsigned long long>(), scale);
  } else {
    const size_t smem = exact_smem<S>(g.D, 3, 1, g.nqb).total;
    set_smem(reinterpret_cast<const void*>(exact_query_kernel<S, 0>), smem);
    exact_query_kernel<S, 0><<<grid, kExactThreads, smem, st>>>(g, q, k, v, mask.as<unsigned long long>(), scale, out,
                                                               lse, nullptr, nullptr, nullptr);
    MOBA_LAUNCHED();
  }
}

template <class S>
void moba_backward(cudaStream_t st, const S* dout, const S* q, const S* k, const S* v, const int32_t* selected,
                   const S* lse, S* dq, S* dk, S* dv, int64_t T, int64_t C, int64_t D, int64_t chunk, int64_t top_k) {
  check_shape(T, C, D, chunk, top_k);
  if (T == 0) return;
  const Geometry g = geometry(T, C, D, chunk);
  const int K1 = int(top_k - 1);
  Scratch mask(st, size_t(g.H) * g.nch * g.nqb * 8);
  build_masks(st, g, selected, K1, mask.as<unsigned long long>());
  const S scale = S(1.0 / std::sqrt(double(D)));
  const dim3 qgrid(unsigned(g.nqb), unsigned(g.H)), kgrid = qgrid;
  if (use_fast<S>(C, D, chunk)) {
    if constexpr (std::is_same_v<S, float>)
      fast_backward(st, g, dout, q, k, v, selected, lse, dq, dk, dv, K1, mask.as<unsigned long long>(), scale);
  } else {
    Scratch delta(st, size_t(T) * g.H * sizeof(S));
    const size_t qsmem = exact_smem<S>(g.D, 4, 1, g.nqb).total;
    set_smem(reinterpret_cast<const void*>(exact_query_kernel<S, 1>), qsmem);
    exact_query_kernel<S, 1><<<qgrid, kExactThreads, qsmem, st>>>(g, q, k, v, mask.as<unsigned long long>(), scale,
                                                                  nullptr, const_cast<S*>(lse), dout, delta.as<S>(), dq);
    MOBA_LAUNCHED();
    const size_t ksmem = exact_smem<S>(g.D, 4, 2, g.nqb).total;
    set_smem(reinterpret_cast<const void*>(exact_key_kernel<S>), ksmem);
    exact_key_kernel<S><<<kgrid, kExactThreads, ksmem, st>>>(g, q, k, v, mask.as<unsigned long long>(), scale, lse,
                                                             dout, delta.as<S>(), dk, dv);
    MOBA_LAUNCHED();
  }
}

#define RWKVX_MOBA_INSTANTIATE(S)                                                                                    \
  template void moba_forward<S>(cudaStream_t, const S*, const S*, const S*, S*, int32_t*, S*, int64_t, int64_t,      \
                                int64_t, int64_t, int64_t);                                                          \
  template void moba_backward<S>(cudaStream_t, const S*, const S*, const S*, const S*, const int32_t*, const S*, S*, \
                                 S*, S*, int64_t, int64_t, int64_t, int64_t, int64_t);
RWKVX_MOBA_INSTANTIATE(float)
RWKVX_MOBA_INSTANTIATE(double)

}  // namespace rwkvx::train::cuda
