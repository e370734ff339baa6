// The whole-step decoder of the CUDA backend: one token for each of B streams through the whole model in
// about 85 kernels (82 for RWKV-X 0.2B and one stream), captured once per batch size as a CUDA graph and
// replayed. It computes what the op path computes (spec model.md §2–§5), with the same fp32 activations (no
// bf16 rounding of activations: weights are read as stored) and the same fp64 top-k gate, so its logits equal
// the op path's to fp32 rounding and its chunk choices are the op path's.
//
// Kernels of one step (per RWKV block: 5, per sparse block: 5 for one stream, 6 for B > 1):
//   gemv_row_kernel   (B = 1) multi-matrix GEMV with the input row in every warp's registers: optional
//                     prologue LayerNorm(x) with token-shift mixes computed on the fly (xn + (shift − xn) ⊙ μ
//                     per matrix), epilogues store / tanh / σ / relu² / residual add / KV-cache store.
//   gemv_kernel       the same for B > 1 (8 rows per tile, grid.y = row tiles; rows staged in shared memory).
//   head_kernel       (B = 1, bf16) the output head, streaming its weights (the next task's rows requested
//                     before the current task's math), written straight into the step's logits tensor.
//   rwkv_head_kernel  per (stream, head): LoRA second stages (decay, learning rate, gate, value residual),
//                     the WKV-7 input prep, one WKV-7 state step, GroupNorm + bonus + gate, token-shift store.
//   gate_mean_kernel  (B > 1) per (stream, head) warp: fp64 top-(k−1) chunk gate; extra blocks store the mean
//                     of a chunk the new key completed. For one stream the attention kernel does both.
//   attend_kernel     split-key decode attention over the chosen chunks + the own chunk (one wave of blocks);
//                     the last split of a (stream, head) merges the partials.
// Single-stream decode is a chain of small latency-bound kernels: every kernel after the first is a
// programmatic dependent launch that requests its weights (never written) and whatever the previous step
// left (WKV state, chunk means) before waiting for its predecessor. (Pulling the weights of later kernels into
// L2 with bulk prefetches was measured slower.) RWKVX_DECODE_PROBE (measurement only) replaces kernels of a
// kind by empty ones, to see what each kind costs inside the chain.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

#include "backend/cuda/cuda_internal.h"
#include "model/config.h"
#include "model/state.h"
#include "model/weights.h"

namespace rwkvx::cuda {
namespace {

constexpr int kRT = 8;          // batch rows per GEMV tile (B > 1)
constexpr int kGemvWarps = 4;   // warps per GEMV block
constexpr int kHN = 64;         // RWKV head size and sparse head dim of this path
constexpr int kMaxSel = 8;      // top_k − 1 at most
constexpr int kMaxJobs = 8;     // matrices per GEMV launch
constexpr float kLnXEps = 64e-5f;

// Programmatic dependent launch: every kernel after the first is launched with programmatic stream
// serialization, so it can start while its predecessor runs. It waits here for the predecessor to complete
// (its writes visible) before touching anything a kernel writes, then lets its own successor launch: the
// successor's weight prefetch overlaps this kernel's work. Only weights (never written) are read before.
__device__ __forceinline__ void await_previous_kernel() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// Device tables for one step; pointers into the batch size's parameter buffer.
struct Tabs {
  const int32_t* ids;       // [B]
  const int32_t* slot;      // [B] state slot of row b
  const int64_t* pos;       // [B] cache slot of the new token (= keys before it)
  float* const* att_shift;  // [n_rwkv] → [slots, C]
  float* const* wkv;        // [n_rwkv] → [slots, H, N, N]
  float* const* ffn_shift;  // [n_rwkv + n_sparse] → [slots, C]
  void* const* kc;          // [n_sparse · B] → [cap, C] (f32 or bf16)
  void* const* vc;          // [n_sparse · B]
  float* const* mean;       // [n_sparse · B] → [cap / chunk, C]
  float* const* logits;     // [1] → [1, vocab]: this step's output tensor (head_kernel writes it in place)
  int B;
};

enum Epi : int { kStore = 0, kTanh, kSigmoid, kRelu2, kAdd, kKvK, kKvV };

struct GemvJob {
  const void* W;  // [N, K] row-major (torch Linear layout)
  int bf16;       // W dtype: 1 bf16, 0 f32
  int N;
  const float* mu;  // prologue mix coefficients [K] (nullptr: input = xn)
  float* out;       // [rows, ldo]
  int ldo;
  int epi;
  int layer;  // kKvK / kKvV: sparse block index
  int task0;  // first task (group of output rows) of this job
};

struct GemvArgs {
  GemvJob job[kMaxJobs];
  int n_jobs;
  int n_tasks;
  int K;
  const float* in;  // input rows [B, K]; nullptr: prologue LayerNorm of x
  const float *x, *ln_w, *ln_b;
  int shift_kind;  // prologue mixes read 0: none, 1: att_shift[shift_layer], 2: ffn_shift[shift_layer]
  int shift_layer;
  float* save_xn;           // prologue: xn rows stored here (blockIdx.x == 0)
  const float* copy_src;    // rows [B, C] copied into ffn_shift[copy_layer] (blockIdx.x == 0)
  int copy_layer;
  int kv_bf16;
  int C;
};

__device__ __forceinline__ void bf16x8(const uint4 u, float* f) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    f[2 * e] = __uint_as_float(w[e] << 16);
    f[2 * e + 1] = __uint_as_float(w[e] & 0xffff0000u);
  }
}

__device__ __forceinline__ int job_of(const GemvArgs& a, int task) {
  int j = 0;
  while (j + 1 < a.n_jobs && task >= a.job[j + 1].task0) ++j;
  return j;
}

// Lane's 16-byte pieces of rows o0 … o0 + kRW − 1 of a bf16 matrix, K columns c0 … c0 + kLoads·256 − 1
// (piece u: columns c0 + u·256 + lane·8 …); zeros past N or K.
template <int kLoads, int kRW>
__device__ __forceinline__ void load_rows(const GemvJob& jb, int o0, int K, int c0, int lane, uint4 (&w)[kRW][kLoads]) {
  const __nv_bfloat16* W = static_cast<const __nv_bfloat16*>(jb.W);
#pragma unroll
  for (int rr = 0; rr < kRW; ++rr)
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = c0 + u * 256 + lane * 8;
      w[rr][u] = (o0 + rr < jb.N && i < K) ? __ldg(reinterpret_cast<const uint4*>(W + int64_t(o0 + rr) * K + i))
                                           : make_uint4(0, 0, 0, 0);
    }
}

__device__ __forceinline__ void gemv_epilogue(const GemvArgs& a, const Tabs& tb, const GemvJob& jb, int r, int o, float v) {
  switch (jb.epi) {
    case kStore: jb.out[int64_t(r) * jb.ldo + o] = v; break;
    case kTanh: jb.out[int64_t(r) * jb.ldo + o] = tanhf(v); break;
    case kSigmoid: jb.out[int64_t(r) * jb.ldo + o] = 1.0f / (1.0f + expf(-v)); break;
    case kRelu2: {
      const float p = v > 0.f ? v : 0.f;
      jb.out[int64_t(r) * jb.ldo + o] = p * p;
      break;
    }
    case kAdd: jb.out[int64_t(r) * jb.ldo + o] += v; break;
    default: {
      void* base = (jb.epi == kKvK ? tb.kc : tb.vc)[jb.layer * tb.B + r];
      const int64_t idx = tb.pos[r] * a.C + o;
      if (a.kv_bf16) static_cast<__nv_bfloat16*>(base)[idx] = __float2bfloat16_rn(v);
      else static_cast<float*>(base)[idx] = v;
    }
  }
}

// Multi-matrix GEMV. Grid (≤ resident blocks, ⌈B/kRows⌉), kGemvWarps warps per block. A task is kRW output
// rows of one job; warps stride over the tasks (a persistent grid: the prologue runs once per block). Each
// lane holds kLoads 16-byte weight pieces per row, the first task's issued before waiting on the previous
// kernel. Dynamic shared memory: xs [R][K] (+ ds [R][K] when a job mixes with the shift), R = min(kRows, B).
template <int kLoads, int kRW, int kRows>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const __grid_constant__ GemvArgs a, const Tabs tb) {
  extern __shared__ __align__(16) float sm[];
  constexpr int kChunk = kLoads * 256;
  const int K = a.K;
  const int r0 = blockIdx.y * kRows, nr = min(kRows, tb.B - r0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* xs = sm;
  float* ds = sm + min(kRows, tb.B) * K;  // shared memory is sized for the rows of a tile
  int task = blockIdx.x * kGemvWarps + warp;
  uint4 w[kRW][kLoads];
  bool have_w = false;
  if (task < a.n_tasks) {
    const GemvJob& jb = a.job[job_of(a, task)];
    if (jb.bf16) load_rows<kLoads, kRW>(jb, (task - jb.task0) * kRW, K, 0, lane, w), have_w = true;
  }
  const bool ln = a.in == nullptr, shift = ln && a.shift_kind != 0;
  // The shift rows' addresses come from the step's tables, constant while the step runs: read before the wait.
  __shared__ const float* s_shift_row[kRows];
  if (shift && int(threadIdx.x) < nr)
    s_shift_row[threadIdx.x] =
        (a.shift_kind == 1 ? tb.att_shift : tb.ffn_shift)[a.shift_layer] + int64_t(tb.slot[r0 + threadIdx.x]) * K;
  await_previous_kernel();
  const int K4 = K / 4;
  float4* xs4 = reinterpret_cast<float4*>(xs);
  if (!ln) {
    const float4* src = reinterpret_cast<const float4*>(a.in + int64_t(r0) * K);
#pragma unroll 4
    for (int e = threadIdx.x; e < nr * K4; e += blockDim.x) xs4[e] = src[e];
  } else {
    // One round trip: x rows (into xs), shift rows (into ds, raw), LayerNorm weight and bias (into lnw, lnb) in
    // groups of kStage 16-byte loads per thread; row statistics by the whole block, two passes; then normalise
    // and form the shift deltas in place.
    constexpr int kStage = 8;
    float4* ds4 = reinterpret_cast<float4*>(ds);
    float4* lnw4 = reinterpret_cast<float4*>(sm + min(kRows, tb.B) * K * (shift ? 2 : 1));  // then lnb
    const float4* src = reinterpret_cast<const float4*>(a.x + int64_t(r0) * K);
    const int n_x = nr * K4, n_xs = n_x * (shift ? 2 : 1), n_all = n_xs + 2 * K4;
    __syncthreads();  // s_shift_row
    for (int base = threadIdx.x; base < n_all; base += kStage * blockDim.x) {
      float4 v[kStage];
#pragma unroll
      for (int u = 0; u < kStage; ++u) {
        const int e = base + u * blockDim.x;
        if (e >= n_all) break;
        if (e < n_x) v[u] = src[e];
        else if (e < n_xs) v[u] = reinterpret_cast<const float4*>(s_shift_row[(e - n_x) / K4])[(e - n_x) % K4];
        else v[u] = e - n_xs < K4 ? __ldg(reinterpret_cast<const float4*>(a.ln_w) + (e - n_xs))
                                  : __ldg(reinterpret_cast<const float4*>(a.ln_b) + (e - n_xs - K4));
      }
#pragma unroll
      for (int u = 0; u < kStage; ++u) {
        const int e = base + u * blockDim.x;
        if (e >= n_all) break;
        if (e < n_x) xs4[e] = v[u];
        else if (e < n_xs) ds4[e - n_x] = v[u];
        else lnw4[e - n_xs] = v[u];
      }
    }
    __syncthreads();
    __shared__ float s_part[2][kGemvWarps][kRows];
    float mean[kRows], inv[kRows];
#pragma unroll
    for (int t = 0; t < kRows; ++t) {
      if (t >= nr) break;
      float p = 0.f;
      for (int i = threadIdx.x; i < K4; i += blockDim.x) {
        const float4 x4 = xs4[t * K4 + i];
        p += x4.x + x4.y + x4.z + x4.w;
      }
      p = warp_sum(p);
      if (lane == 0) s_part[0][warp][t] = p;
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kRows; ++t) {
      if (t >= nr) break;
      float sum = 0.f;
#pragma unroll
      for (int w2 = 0; w2 < kGemvWarps; ++w2) sum += s_part[0][w2][t];
      mean[t] = sum / float(K);
      float p = 0.f;
      for (int i = threadIdx.x; i < K4; i += blockDim.x) {
        const float4 x4 = xs4[t * K4 + i];
        p += (x4.x - mean[t]) * (x4.x - mean[t]) + (x4.y - mean[t]) * (x4.y - mean[t]) +
             (x4.z - mean[t]) * (x4.z - mean[t]) + (x4.w - mean[t]) * (x4.w - mean[t]);
      }
      p = warp_sum(p);
      if (lane == 0) s_part[1][warp][t] = p;
    }
    __syncthreads();
    const bool save = a.save_xn && blockIdx.x == 0;
#pragma unroll
    for (int t = 0; t < kRows; ++t) {
      if (t >= nr) break;
      float var = 0.f;
#pragma unroll
      for (int w2 = 0; w2 < kGemvWarps; ++w2) var += s_part[1][w2][t];
      inv[t] = rsqrtf(var / float(K) + 1e-5f);
      for (int i = threadIdx.x; i < K4; i += blockDim.x) {
        const float4 w4 = lnw4[i], b4 = lnw4[K4 + i];
        float4 x4 = xs4[t * K4 + i];
        x4.x = (x4.x - mean[t]) * inv[t] * w4.x + b4.x, x4.y = (x4.y - mean[t]) * inv[t] * w4.y + b4.y;
        x4.z = (x4.z - mean[t]) * inv[t] * w4.z + b4.z, x4.w = (x4.w - mean[t]) * inv[t] * w4.w + b4.w;
        xs4[t * K4 + i] = x4;
        if (shift) {
          const float4 s4 = ds4[t * K4 + i];
          ds4[t * K4 + i] = make_float4(s4.x - x4.x, s4.y - x4.y, s4.z - x4.z, s4.w - x4.w);
        }
        if (save) reinterpret_cast<float4*>(a.save_xn + int64_t(r0 + t) * K)[i] = x4;
      }
    }
  }
  if (a.copy_src && blockIdx.x == 0) {
    for (int e = threadIdx.x; e < nr * a.C; e += blockDim.x) {
      const int r = r0 + e / a.C, c = e % a.C;
      tb.ffn_shift[a.copy_layer][int64_t(tb.slot[r]) * a.C + c] = a.copy_src[int64_t(r) * a.C + c];
    }
  }
  __syncthreads();
  for (; task < a.n_tasks; task += gridDim.x * kGemvWarps) {
    const GemvJob& jb = a.job[job_of(a, task)];
    const int o0 = (task - jb.task0) * kRW;
    const bool mix = jb.mu != nullptr;
    float acc[kRW][kRows];
#pragma unroll
    for (int rr = 0; rr < kRW; ++rr)
#pragma unroll
      for (int t = 0; t < kRows; ++t) acc[rr][t] = 0.f;
    for (int c0 = 0; c0 < K; c0 += kChunk) {
      if (jb.bf16 && !have_w) load_rows<kLoads, kRW>(jb, o0, K, c0, lane, w);
      have_w = false;
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int i = c0 + u * 256 + lane * 8;
        if (i >= K) break;
        float wf[kRW][8];
#pragma unroll
        for (int rr = 0; rr < kRW; ++rr) {
          if (jb.bf16) {
            bf16x8(w[rr][u], wf[rr]);
          } else {
            const float* W = static_cast<const float*>(jb.W) + int64_t(min(o0 + rr, jb.N - 1)) * K + i;
            const float4 p = __ldg(reinterpret_cast<const float4*>(W)), q = __ldg(reinterpret_cast<const float4*>(W) + 1);
            wf[rr][0] = p.x, wf[rr][1] = p.y, wf[rr][2] = p.z, wf[rr][3] = p.w;
            wf[rr][4] = q.x, wf[rr][5] = q.y, wf[rr][6] = q.z, wf[rr][7] = q.w;
          }
        }
        float m[8];
        if (mix) {
          const float4 m0 = __ldg(reinterpret_cast<const float4*>(jb.mu + i)), m1 = __ldg(reinterpret_cast<const float4*>(jb.mu + i + 4));
          m[0] = m0.x, m[1] = m0.y, m[2] = m0.z, m[3] = m0.w, m[4] = m1.x, m[5] = m1.y, m[6] = m1.z, m[7] = m1.w;
        }
#pragma unroll
        for (int t = 0; t < kRows; ++t) {
          if (t >= nr) break;
          const float4 x0 = *reinterpret_cast<const float4*>(xs + t * K + i);
          const float4 x1 = *reinterpret_cast<const float4*>(xs + t * K + i + 4);
          float xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
          if (mix) {
            const float4 d0 = *reinterpret_cast<const float4*>(ds + t * K + i);
            const float4 d1 = *reinterpret_cast<const float4*>(ds + t * K + i + 4);
            const float dv[8] = {d0.x, d0.y, d0.z, d0.w, d1.x, d1.y, d1.z, d1.w};
#pragma unroll
            for (int e = 0; e < 8; ++e) xv[e] = xv[e] + dv[e] * m[e];
          }
#pragma unroll
          for (int rr = 0; rr < kRW; ++rr)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[rr][t] += wf[rr][e] * xv[e];
        }
      }
    }
    // The kRW × kRows sums over the warp as one reduce-scatter: at each xor distance a lane keeps half of its
    // values and adds the partner's copy of them: 31 shuffles in all instead of 5 per value. Every sum is the
    // same xor tree as warp_sum's (v_l + v_{l^o} at o = 16 … 1), so the results are bitwise those of warp_sum.
    // Afterwards value index lane >> (5 − log2 kN) is complete in every lane of its group of 32 / kN.
    constexpr int kN = kRW * kRows;
    static_assert((kN & (kN - 1)) == 0 && kN <= 32, "gemv: reduce-scatter needs a power of two ≤ 32 sums");
    float v[kN];
#pragma unroll
    for (int rr = 0; rr < kRW; ++rr)
#pragma unroll
      for (int t = 0; t < kRows; ++t) v[rr * kRows + t] = acc[rr][t];
    int split = 0;  // halving steps done: log2 kN at the end
#pragma unroll
    for (int i = 0; i < 5; ++i) {
      const int o = 16 >> i, live = kN >> i;
      if (live >= 2) {
        const bool upper = (lane & o) != 0;
#pragma unroll
        for (int j = 0; j < live / 2; ++j) {
          const float send = upper ? v[j] : v[j + live / 2], keep = upper ? v[j + live / 2] : v[j];
          v[j] = keep + __shfl_xor_sync(0xffffffffu, send, o);
        }
        ++split;
      } else {
        v[0] += __shfl_xor_sync(0xffffffffu, v[0], o);
      }
    }
    const int idx = lane >> (5 - split), rr = idx / kRows, t = idx % kRows, o = o0 + rr;
    if ((lane & ((1 << (5 - split)) - 1)) == 0 && t < nr && o < jb.N) gemv_epilogue(a, tb, jb, r0 + t, o, v[0]);
  }
}

// 8 consecutive floats p[0 … 7] (16-byte aligned).
__device__ __forceinline__ void load8(const float* p, float* f) {
  const float4 u = *reinterpret_cast<const float4*>(p), v = *reinterpret_cast<const float4*>(p + 4);
  f[0] = u.x, f[1] = u.y, f[2] = u.z, f[3] = u.w, f[4] = v.x, f[5] = v.y, f[6] = v.z, f[7] = v.w;
}
__device__ __forceinline__ void ldg8(const float* p, float* f) {
  const float4 u = __ldg(reinterpret_cast<const float4*>(p)), v = __ldg(reinterpret_cast<const float4*>(p + 4));
  f[0] = u.x, f[1] = u.y, f[2] = u.z, f[3] = u.w, f[4] = v.x, f[5] = v.y, f[6] = v.z, f[7] = v.w;
}

// Single-stream GEMV (B = 1, K ≤ kLoads·256): no shared memory and no block barrier on the critical path.
// Every warp holds the whole input row in registers (lane: columns u·256 + lane·8 … + 7, the columns of its
// weight pieces), does the prologue LayerNorm with shuffles (each warp redundantly: 24 values a lane), then
// dots its tasks' rows. Grid (≤ resident blocks), kGemvWarps warps per block, tasks of kRW rows as above.
// kLn: the input is LayerNorm(x) with optional shift mixes (a.in == nullptr), else the rows a.in.
template <int kLoads, int kRW, bool kLn>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_row_kernel(const __grid_constant__ GemvArgs a, const Tabs tb) {
  constexpr int kMixLoads = kLn ? kLoads : 1;  // register arrays only the LayerNorm prologue uses
  const int K = a.K;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool shift = kLn && a.shift_kind != 0;
  int task = blockIdx.x * kGemvWarps + warp;
  uint4 w[kRW][kLoads];
  float mu[kMixLoads][8];
  bool have_w = false, have_mu = false;
  if (task < a.n_tasks) {  // the first task's weights and mix coefficients (never written)
    const GemvJob& jb = a.job[job_of(a, task)];
    if (jb.bf16) load_rows<kLoads, kRW>(jb, (task - jb.task0) * kRW, K, 0, lane, w), have_w = true;
    if constexpr (kLn) {
      if (jb.mu) {
#pragma unroll
        for (int u = 0; u < kLoads; ++u)
          if (u * 256 + lane * 8 < K) ldg8(jb.mu + u * 256 + lane * 8, mu[u]);
        have_mu = true;
      }
    }
  }
  // The shift row's address comes from the step's tables, constant while the step runs.
  const float* shift_row =
      shift ? (a.shift_kind == 1 ? tb.att_shift : tb.ffn_shift)[a.shift_layer] + int64_t(tb.slot[0]) * K : nullptr;
  await_previous_kernel();
  // Residual adds: lane rr reads output o0 + rr of its task before the math (with the input row for the
  // first task), so the epilogue is a plain store.
  float prior = 0.f;
  bool have_prior = false;
  if (task < a.n_tasks) {
    const GemvJob& jb = a.job[job_of(a, task)];
    const int o = (task - jb.task0) * kRW + lane;
    if (jb.epi == kAdd && lane < kRW && o < jb.N) prior = jb.out[o];
    have_prior = true;
  }
  float xv[kLoads][8], dv[kMixLoads][8];
  if constexpr (!kLn) {
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = u * 256 + lane * 8;
#pragma unroll
      for (int e = 0; e < 8; ++e) xv[u][e] = 0.f;
      if (i < K) load8(a.in + i, xv[u]);
    }
  } else {
    float lw[kLoads][8], lb[kLoads][8];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = u * 256 + lane * 8;
#pragma unroll
      for (int e = 0; e < 8; ++e) xv[u][e] = dv[u][e] = lw[u][e] = lb[u][e] = 0.f;
      if (i < K) {
        load8(a.x + i, xv[u]);
        if (shift) load8(shift_row + i, dv[u]);
        ldg8(a.ln_w + i, lw[u]), ldg8(a.ln_b + i, lb[u]);
      }
    }
    {
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < kLoads; ++u)
#pragma unroll
        for (int e = 0; e < 8; ++e) sum += xv[u][e];
      const float mean = warp_sum(sum) / float(K);
      float var = 0.f;
#pragma unroll
      for (int u = 0; u < kLoads; ++u)
        if (u * 256 + lane * 8 < K)
#pragma unroll
          for (int e = 0; e < 8; ++e) var += (xv[u][e] - mean) * (xv[u][e] - mean);
      const float inv = rsqrtf(warp_sum(var) / float(K) + 1e-5f);
      const bool save = a.save_xn && blockIdx.x == 0 && warp == 0;
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int i = u * 256 + lane * 8;
        if (i >= K) continue;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          xv[u][e] = (xv[u][e] - mean) * inv * lw[u][e] + lb[u][e];
          if (shift) dv[u][e] = dv[u][e] - xv[u][e];
        }
        if (save) {
          reinterpret_cast<float4*>(a.save_xn + i)[0] = make_float4(xv[u][0], xv[u][1], xv[u][2], xv[u][3]);
          reinterpret_cast<float4*>(a.save_xn + i)[1] = make_float4(xv[u][4], xv[u][5], xv[u][6], xv[u][7]);
        }
      }
    }
  }
  if (a.copy_src && blockIdx.x == 0)
    for (int c = threadIdx.x; c < a.C; c += blockDim.x) tb.ffn_shift[a.copy_layer][int64_t(tb.slot[0]) * a.C + c] = a.copy_src[c];
  for (; task < a.n_tasks; task += gridDim.x * kGemvWarps) {
    const GemvJob& jb = a.job[job_of(a, task)];
    const int o0 = (task - jb.task0) * kRW;
    const bool mix = kLn && jb.mu != nullptr;
    if (jb.bf16 && !have_w) load_rows<kLoads, kRW>(jb, o0, K, 0, lane, w);
    if constexpr (kLn) {
      if (mix && !have_mu) {
#pragma unroll
        for (int u = 0; u < kLoads; ++u)
          if (u * 256 + lane * 8 < K) ldg8(jb.mu + u * 256 + lane * 8, mu[u]);
      }
    }
    if (jb.epi == kAdd && !have_prior && lane < kRW && o0 + lane < jb.N) prior = jb.out[o0 + lane];
    have_w = have_mu = have_prior = false;
    float acc[kRW];
#pragma unroll
    for (int rr = 0; rr < kRW; ++rr) acc[rr] = 0.f;
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = u * 256 + lane * 8;
      if (i >= K) break;
      float xm[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) xm[e] = xv[u][e];
      if constexpr (kLn) {
        if (mix) {
#pragma unroll
          for (int e = 0; e < 8; ++e) xm[e] = xv[u][e] + dv[u][e] * mu[u][e];
        }
      }
#pragma unroll
      for (int rr = 0; rr < kRW; ++rr) {
        float wf[8];
        if (jb.bf16) bf16x8(w[rr][u], wf);
        else ldg8(static_cast<const float*>(jb.W) + int64_t(min(o0 + rr, jb.N - 1)) * K + i, wf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[rr] += wf[e] * xm[e];
      }
    }
#pragma unroll
    for (int rr = 0; rr < kRW; ++rr) {
      const int o = o0 + rr;
      if (o >= jb.N) break;  // warp-uniform
      const float v = warp_sum(acc[rr]);
      if (lane == rr) {
        if (jb.epi == kAdd) jb.out[o] = prior + v;  // = out += v
        else gemv_epilogue(a, tb, jb, 0, o, v);
      }
    }
  }
}

// Sums over the warp of kR per-lane partials (kR a power of two ≤ 32) in kR − 1 + 5 − log2 kR shuffles instead of
// 5·kR: at each of the first log2 kR levels a lane keeps half of its rows and adds its partner's half of them.
// Lane l ends with the total of row l / (32 / kR).
template <int kR>
__device__ __forceinline__ float warp_sum_rows(const float (&in)[kR], int lane) {
  float v[kR];
#pragma unroll
  for (int i = 0; i < kR; ++i) v[i] = in[i];
#pragma unroll
  for (int lvl = 0; (1 << lvl) < kR; ++lvl) {
    const int half = kR >> (lvl + 1), off = 16 >> lvl;
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float keep = upper ? v[i + half] : v[i], send = upper ? v[i] : v[i + half];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
  }
#pragma unroll
  for (int off = 32 / kR / 2; off > 0; off >>= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], off);
  return v[0];
}

// The output head for one stream (B = 1, K ≤ 768, bf16 weights): logits = W · LayerNorm(x), written into the
// step's logits tensor. A task is kRW consecutive rows of W (kRW · 2 K bytes); a persistent grid of resident
// blocks, each warp walking its tasks with the next task's weights requested before the current task's math
// and reduction, so two tasks' loads are in flight per warp most of the time (the head is ≈ 30% of the bytes
// a step reads and must stream at close to the DRAM bandwidth). LayerNorm by shuffles in every warp.
template <int kRW>
__global__ void __launch_bounds__(kGemvWarps * 32) head_kernel(const __grid_constant__ GemvArgs a, const Tabs tb) {
  const GemvJob& jb = a.job[0];
  const int K = a.K, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int stride = gridDim.x * kGemvWarps;
  int task = blockIdx.x * kGemvWarps + warp;
  uint4 w[kRW][3];
  load_rows<3, kRW>(jb, task * kRW, K, 0, lane, w);  // zeros past the last row
  float xv[3][8], lw[3][8], lb[3][8];
#pragma unroll
  for (int u = 0; u < 3; ++u) {
    const int i = u * 256 + lane * 8;
#pragma unroll
    for (int e = 0; e < 8; ++e) xv[u][e] = lw[u][e] = lb[u][e] = 0.f;
    if (i < K) ldg8(a.ln_w + i, lw[u]), ldg8(a.ln_b + i, lb[u]);
  }
  float* out = tb.logits[0];
  await_previous_kernel();
#pragma unroll
  for (int u = 0; u < 3; ++u) {
    const int i = u * 256 + lane * 8;
    if (i < K) load8(a.x + i, xv[u]);
  }
  {
    float sum = 0.f;
#pragma unroll
    for (int u = 0; u < 3; ++u)
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += xv[u][e];
    const float mean = warp_sum(sum) / float(K);
    float var = 0.f;
#pragma unroll
    for (int u = 0; u < 3; ++u)
      if (u * 256 + lane * 8 < K)
#pragma unroll
        for (int e = 0; e < 8; ++e) var += (xv[u][e] - mean) * (xv[u][e] - mean);
    const float inv = rsqrtf(warp_sum(var) / float(K) + 1e-5f);
#pragma unroll
    for (int u = 0; u < 3; ++u)
      if (u * 256 + lane * 8 < K)
#pragma unroll
        for (int e = 0; e < 8; ++e) xv[u][e] = (xv[u][e] - mean) * inv * lw[u][e] + lb[u][e];
  }
  for (; task < a.n_tasks; task += stride) {
    uint4 wn[kRW][3];
    load_rows<3, kRW>(jb, (task + stride) * kRW, K, 0, lane, wn);  // the next task's rows (zeros past the end)
    float acc[kRW];
#pragma unroll
    for (int rr = 0; rr < kRW; ++rr) acc[rr] = 0.f;
#pragma unroll
    for (int u = 0; u < 3; ++u) {
#pragma unroll
      for (int rr = 0; rr < kRW; ++rr) {
        float wf[8];
        bf16x8(w[rr][u], wf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[rr] += wf[e] * xv[u][e];
      }
    }
    const float v = warp_sum_rows<kRW>(acc, lane);
    const int o = task * kRW + lane / (32 / kRW);
    if (lane % (32 / kRW) == 0 && o < jb.N) out[o] = v;
#pragma unroll
    for (int rr = 0; rr < kRW; ++rr)
#pragma unroll
      for (int u = 0; u < 3; ++u) w[rr][u] = wn[rr][u];
  }
}

// Measurement only (RWKVX_DECODE_PROBE=1): stands in for every kernel of a step, same grid and block, no work,
// so a step's time is the chain's fixed cost alone. The logits are not computed.
__global__ void probe_kernel() { await_previous_kernel(); }

// x[b] = LayerNorm0(emb[ids[b]]): block per row.
__global__ void embed_kernel(const void* E, int bf16, int C, const float* w, const float* bias, const Tabs tb, float* x) {
  await_previous_kernel();
  extern __shared__ float er[];  // the embedding row, read once
  const int b = blockIdx.x;
  const int64_t row = int64_t(tb.ids[b]) * C;
  float* xo = x + int64_t(b) * C;
#pragma unroll 4
  for (int c = threadIdx.x; c < C; c += blockDim.x)
    er[c] = bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(E)[row + c]) : static_cast<const float*>(E)[row + c];
  __syncthreads();
  float s = 0.f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) s += er[c];
  const float mean = block_sum(s) / float(C);
  float v = 0.f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) v += (er[c] - mean) * (er[c] - mean);
  const float inv = rsqrtf(block_sum(v) / float(C) + 1e-5f);
  for (int c = threadIdx.x; c < C; c += blockDim.x) xo[c] = (er[c] - mean) * inv * w[c] + bias[c];
}

struct HeadArgs {
  const float *r, *k, *v, *hw, *ha, *hg, *hv;  // [B, C], [B, d*]
  float* vfirst;
  int first;
  const void *w2t, *a2t, *g2t, *v2t;  // transposed second LoRA stages [C, d*]
  int bf16;
  int dw, da, dg, dv;
  const float *w0, *a0, *v0, *k_k, *k_a, *r_k, *ln_w, *ln_b;
  const float* xsave;  // LayerNorm1 output rows (the new token shift)
  int layer;
  float* y;  // [B, C]
  int C;
};

__device__ __forceinline__ float wat(const void* W, int bf16, int64_t i) {
  return bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(W)[i]) : static_cast<const float*>(W)[i];
}

constexpr int kLoraPieces = 16;  // 16-byte pieces of a second-stage LoRA row a thread holds (128 bf16, 64 f32)

// Block per (row, head), 256 threads. Dynamic shared memory: hw, ha, hg, hv rows. Before waiting on the
// previous kernel, thread (m, j) = (tid / 64, tid % 64) loads row h·64 + j of second-stage LoRA matrix m (decay,
// learning rate, gate, value residual) into registers, threads < 64 their channel's constants, and every
// thread its piece of the WKV state. (Staging the LoRA rows in shared memory with cp.async instead, to hold
// fewer registers, was measured slower.)
__global__ void __launch_bounds__(256) rwkv_head_kernel(const HeadArgs a, const Tabs tb) {
  extern __shared__ float lora[];
  __shared__ float s_w[kHN], s_a[kHN], s_kk[kHN], s_k[kHN], s_v[kHN], s_r[kHN], s_g[kHN], s_y[kHN];
  __shared__ float s_dot[4][kHN];
  __shared__ float s_n2[2];
  const int H = a.C / kHN, b = blockIdx.x / H, h = blockIdx.x % H, tid = threadIdx.x, lane = tid & 31;
  const int m = tid / kHN, j = tid % kHN, c = h * kHN + j;
  const void* M = m == 0 ? a.w2t : m == 1 ? a.a2t : m == 2 ? a.g2t : a.v2t;
  const int d = m == 0 ? a.dw : m == 1 ? a.da : m == 2 ? a.dg : a.dv;  // dv = 0 in the first block
  const int es = a.bf16 ? 2 : 4;
  const int pieces = d > 0 && (d * es) % 16 == 0 ? min(d * es / 16, kLoraPieces) : 0;
  uint4 wp[kLoraPieces];
  {
    const uint4* row = reinterpret_cast<const uint4*>(static_cast<const char*>(M) + int64_t(c) * d * es);
#pragma unroll
    for (int u = 0; u < kLoraPieces; ++u) wp[u] = u < pieces ? __ldg(row + u) : make_uint4(0, 0, 0, 0);
  }
  float w0c = 0.f, a0c = 0.f, v0c = 0.f, kkc = 0.f, kac = 0.f;
  if (tid < kHN) {
    w0c = a.w0[c], a0c = a.a0[c], kkc = a.k_k[c], kac = a.k_a[c];
    if (!a.first) v0c = a.v0[c];
  }
  float rk0 = 0.f, rk1 = 0.f, lw0 = 0.f, lw1 = 0.f, lb0 = 0.f, lb1 = 0.f;  // GroupNorm constants (warp 0)
  if (tid < 32) {
    const int c0 = h * kHN + lane, c1 = c0 + 32;
    rk0 = a.r_k[c0], rk1 = a.r_k[c1], lw0 = a.ln_w[c0], lw1 = a.ln_w[c1], lb0 = a.ln_b[c0], lb1 = a.ln_b[c1];
  }
  // The WKV state of this layer was last written by the previous step (every kernel of which completed before
  // this step's first kernel started), so it is read before the wait too: its DRAM round trip overlaps the
  // previous kernel instead of following it.
  const int i_row = tid >> 2, g_col = tid & 3;  // WKV step: thread (i, g) owns state row i, columns g·16 … g·16 + 15
  float* S = tb.wkv[a.layer] + ((int64_t(tb.slot[b]) * H + h) * kHN + i_row) * kHN + g_col * 16;
  float st[16];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float4 f = reinterpret_cast<const float4*>(S)[e];
    st[4 * e] = f.x, st[4 * e + 1] = f.y, st[4 * e + 2] = f.z, st[4 * e + 3] = f.w;
  }
  await_previous_kernel();
  // This channel's r, k, v (and the first block's v) in the same round trip as the LoRA inputs.
  float rc = 0.f, kc = 0.f, vc = 0.f, vfc = 0.f;
  if (tid < kHN) {
    const int64_t o = int64_t(b) * a.C + c;
    rc = a.r[o], kc = a.k[o], vc = a.v[o];
    if (!a.first) vfc = a.vfirst[o];
  }
  float *lw = lora, *la = lw + a.dw, *lg = la + a.da, *lv = lg + a.dg;
  for (int x = tid; x < a.dw; x += 256) lw[x] = a.hw[int64_t(b) * a.dw + x];
  for (int x = tid; x < a.da; x += 256) la[x] = a.ha[int64_t(b) * a.da + x];
  for (int x = tid; x < a.dg; x += 256) lg[x] = a.hg[int64_t(b) * a.dg + x];
  if (!a.first)
    for (int x = tid; x < a.dv; x += 256) lv[x] = a.hv[int64_t(b) * a.dv + x];
  __syncthreads();
  {  // second LoRA stages: thread (m, j) dots its row with the first stage's output
    const float* lin = m == 0 ? lw : m == 1 ? la : m == 2 ? lg : lv;
    float dp[2] = {0.f, 0.f};  // even and odd pieces: two dependency chains of half the length
    auto piece = [&](int u, const uint4 w4) {
      float& dot = dp[u & 1];
      if (a.bf16) {
        float f[8];
        bf16x8(w4, f);
#pragma unroll
        for (int e = 0; e < 8; ++e) dot += f[e] * lin[u * 8 + e];
      } else {
        dot += __uint_as_float(w4.x) * lin[u * 4] + __uint_as_float(w4.y) * lin[u * 4 + 1] +
               __uint_as_float(w4.z) * lin[u * 4 + 2] + __uint_as_float(w4.w) * lin[u * 4 + 3];
      }
    };
#pragma unroll
    for (int u = 0; u < kLoraPieces; ++u) {
      if (u >= pieces) break;
      piece(u, wp[u]);
    }
    float dot = dp[0] + dp[1];
    for (int x = pieces * (16 / es); x < d; ++x) dot += lin[x] * wat(M, a.bf16, int64_t(c) * d + x);  // rows too long or unaligned
    s_dot[m][j] = dot;
  }
  __syncthreads();
  if (tid < kHN) {
    const float dec = s_dot[0][j], lr = s_dot[1][j], gt = s_dot[2][j], vg = s_dot[3][j];
    s_w[j] = expf(-0.60653065971263342f / (1.0f + expf(-(w0c + dec))));
    const float av = 1.0f / (1.0f + expf(-(a0c + lr)));
    s_a[j] = av;
    const float kk = kc * kkc;
    s_kk[j] = kk;
    s_k[j] = kc * (1.0f + (av - 1.0f) * kac);
    float vv = vc;
    if (a.first) {
      a.vfirst[int64_t(b) * a.C + c] = vv;
    } else {
      const float g = 1.0f / (1.0f + expf(-(v0c + vg)));
      vv += (vfc - vv) * g;
    }
    s_v[j] = vv;
    s_r[j] = rc;
    s_g[j] = gt;
    const float kk2 = warp_sum(kk * kk);  // |kk|² of this warp's 32 channels (warps 0 and 1)
    if (lane == 0) s_n2[tid >> 5] = kk2;
  }
  __syncthreads();
  {  // WKV step; α = −kk/|kk|, β = kk/|kk| ⊙ a formed here from kk, a and the two halves of |kk|²
    const int i = i_row, g = g_col;
    const float inv_norm = 1.0f / fmaxf(sqrtf(s_n2[0] + s_n2[1]), 1e-12f);  // one division, not 16
    float kn[16];
#pragma unroll
    for (int jj = 0; jj < 16; ++jj) kn[jj] = s_kk[g * 16 + jj] * inv_norm;
    float sa = 0.f;
#pragma unroll
    for (int jj = 0; jj < 16; ++jj) sa += st[jj] * -kn[jj];
    sa += __shfl_xor_sync(0xffffffffu, sa, 1);
    sa += __shfl_xor_sync(0xffffffffu, sa, 2);
    const float vi = s_v[i];
    float yv = 0.f;
#pragma unroll
    for (int jj = 0; jj < 16; ++jj) {
      const int jc = g * 16 + jj;
      st[jj] = st[jj] * s_w[jc] + sa * (kn[jj] * s_a[jc]) + vi * s_k[jc];
      yv += st[jj] * s_r[jc];
    }
    yv += __shfl_xor_sync(0xffffffffu, yv, 1);
    yv += __shfl_xor_sync(0xffffffffu, yv, 2);
#pragma unroll
    for (int e = 0; e < 4; ++e)
      reinterpret_cast<float4*>(S)[e] = make_float4(st[4 * e], st[4 * e + 1], st[4 * e + 2], st[4 * e + 3]);
    if (g == 0) s_y[i] = yv;
  }
  __syncthreads();
  if (tid < 32) {  // GroupNorm of the head, bonus (Σ r k r_k) v, gate
    const int c0 = h * kHN + lane, c1 = c0 + 32;
    const float y0 = s_y[lane], y1 = s_y[lane + 32];
    const float mean = warp_sum(y0 + y1) / float(kHN);
    const float d0 = y0 - mean, d1 = y1 - mean;
    const float inv = rsqrtf(warp_sum(d0 * d0 + d1 * d1) / float(kHN) + kLnXEps);
    const float u = warp_sum(s_r[lane] * s_k[lane] * rk0 + s_r[lane + 32] * s_k[lane + 32] * rk1);
    float* yo = a.y + int64_t(b) * a.C;
    yo[c0] = (d0 * inv * lw0 + lb0 + u * s_v[lane]) * s_g[lane];
    yo[c1] = (d1 * inv * lw1 + lb1 + u * s_v[lane + 32]) * s_g[lane + 32];
  } else if (tid >= 64 && tid < 64 + kHN) {  // the new token shift of this head's channels
    const int c = h * kHN + tid - 64;
    tb.att_shift[a.layer][int64_t(tb.slot[b]) * a.C + c] = a.xsave[int64_t(b) * a.C + c];
  }
}

// Four floats of shared memory, read afresh at each use (volatile: not hoisted out of loops into registers).
__device__ __forceinline__ float4 lds_f4(const float* p) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(unsigned(__cvta_generic_to_shared(p))));
  return v;
}

// Warp-level top-(k−1) chunk gate of one (row, head): q·mean_n in fp64 over the complete past chunks n < j, the
// top n_sel = min(Kp, j) (ties: lower n), in ascending chunk order in res[0 … n_sel) of every lane, −1 after.
// qv: the head's 64 query values in shared memory. kPer chunks of a lane per memory round trip (the insertion
// order, hence the choice, is the same for any kPer: a lane's chunks lane, lane + 32, … in turn); the attention
// kernel uses 1 to keep its register count down.
template <int kPer>
__device__ __forceinline__ int gate_select(const float* qv, const float* mean, int64_t j, int Kp, int C, int h, int lane,
                                           int32_t (&res)[kMaxSel]) {
  const int n_sel = int(min_i64(Kp, j));
  double bs[kMaxSel];
  int64_t bn[kMaxSel];
#pragma unroll
  for (int u = 0; u < kMaxSel; ++u) bs[u] = 0, bn[u] = -1;
  for (int64_t n0 = lane; n0 < j; n0 += 32 * kPer) {
    double s2[kPer];
#pragma unroll
    for (int q = 0; q < kPer; ++q) s2[q] = 0;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      if (n0 + 32 * q >= j) break;
      const float* m = mean + (n0 + 32 * q) * C + int64_t(h) * kHN;
#pragma unroll
      for (int d = 0; d < kHN; d += 4) {
        const float4 m4 = *reinterpret_cast<const float4*>(m + d);
        const float4 q4 = lds_f4(qv + d);
        s2[q] += double(q4.x) * double(m4.x);
        s2[q] += double(q4.y) * double(m4.y);
        s2[q] += double(q4.z) * double(m4.z);
        s2[q] += double(q4.w) * double(m4.w);
      }
    }
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int64_t n = n0 + 32 * q;
      if (n >= j) break;
      const double s = s2[q];
      int p = n_sel;
#pragma unroll
      for (int u = kMaxSel - 1; u >= 0; --u)
        if (u < n_sel && (bn[u] < 0 || s > bs[u])) p = u;
#pragma unroll
      for (int u = kMaxSel - 1; u > 0; --u)
        if (u > p && u < n_sel) bs[u] = bs[u - 1], bn[u] = bn[u - 1];
#pragma unroll
      for (int u = 0; u < kMaxSel; ++u)
        if (u == p) bs[u] = s, bn[u] = n;
    }
  }
  int hd = 0;
#pragma unroll
  for (int r = 0; r < kMaxSel; ++r) res[r] = -1;
  for (int r = 0; r < n_sel; ++r) {
    double cs = 0;
    int64_t cn = -1;
#pragma unroll
    for (int u = 0; u < kMaxSel; ++u)
      if (u == hd) cs = bs[u], cn = bn[u];
    for (int o = 16; o > 0; o >>= 1) {
      const double os = __shfl_xor_sync(0xffffffffu, cs, o);
      const int64_t on = __shfl_xor_sync(0xffffffffu, cn, o);
      if (on >= 0 && (cn < 0 || os > cs || (os == cs && on < cn))) cs = os, cn = on;
    }
    int64_t mine = -1;
#pragma unroll
    for (int u = 0; u < kMaxSel; ++u)
      if (u == hd) mine = bn[u];
    if (mine == cn && hd < n_sel) ++hd;
#pragma unroll
    for (int u = 0; u < kMaxSel; ++u)
      if (u == r) res[u] = int32_t(cn);
  }
  for (int x = 1; x < n_sel; ++x)  // ascending chunk order
    for (int y = x; y > 0 && res[y - 1] > res[y]; --y) {
      const int32_t tmp = res[y];
      res[y] = res[y - 1], res[y - 1] = tmp;
    }
  return n_sel;
}

// Column `col` of the mean of the chunk that row b's new key (cache slot pos[b]) completed, if it completed one
// (fp64 sum in row order, as the op path's chunk_mean_kernel). Only read from the next step on.
__device__ __forceinline__ void chunk_mean_update(const Tabs& tb, int layer, int C, int64_t chunk, int kv_bf16, int b, int col) {
  if (b >= tb.B || col >= C) return;
  const int64_t t = tb.pos[b];
  if ((t + 1) % chunk != 0) return;
  const int64_t n = t / chunk;
  const void* K = tb.kc[layer * tb.B + b];
  double s = 0;
  for (int64_t r = n * chunk; r < (n + 1) * chunk; ++r)
    s += kv_bf16 ? double(__bfloat162float(static_cast<const __nv_bfloat16*>(K)[r * C + col]))
                 : double(static_cast<const float*>(K)[r * C + col]);
  tb.mean[layer * tb.B + b][n * C + col] = float(s / double(chunk));
}

struct GateArgs {
  const float* q;  // [B, C]
  int layer, C, H, Kp, gate_blocks, mean_blocks_per_row;
  int64_t chunk;
  int32_t* sel;  // [B·H, kMaxSel]
  int kv_bf16;
};

// Blocks [0, gate_blocks): warp per (row, head), gate_select into sel. Later blocks: chunk_mean_update.
__global__ void __launch_bounds__(256) gate_mean_kernel(const GateArgs a, const Tabs tb) {
  await_previous_kernel();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (int(blockIdx.x) < a.gate_blocks) {
    const int wid = blockIdx.x * 8 + warp;
    if (wid >= tb.B * a.H) return;
    const int b = wid / a.H, h = wid % a.H;
    __shared__ float qw[8][kHN];
    qw[warp][lane] = a.q[int64_t(b) * a.C + int64_t(h) * kHN + lane];
    qw[warp][lane + 32] = a.q[int64_t(b) * a.C + int64_t(h) * kHN + lane + 32];
    __syncwarp();
    int32_t res[kMaxSel];
    const int n_sel = gate_select<2>(qw[warp], tb.mean[a.layer * tb.B + b], tb.pos[b] / a.chunk, a.Kp, a.C, h, lane, res);
    if (lane == 0) {
      int32_t* out = a.sel + int64_t(wid) * kMaxSel;
      for (int r = 0; r < kMaxSel; ++r) out[r] = r < n_sel ? res[r] : -1;
    }
    return;
  }
  const int idx = blockIdx.x - a.gate_blocks, b = idx / a.mean_blocks_per_row;
  chunk_mean_update(tb, a.layer, a.C, a.chunk, a.kv_bf16, b, (idx % a.mean_blocks_per_row) * 256 + threadIdx.x);
}

template <typename KT>
__device__ __forceinline__ float dot64(const float* qs, const KT* kr);
template <>
__device__ __forceinline__ float dot64<float>(const float* qs, const float* kr) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < 16; ++e) {
    const float4 k4 = __ldg(reinterpret_cast<const float4*>(kr) + e);
    s += qs[4 * e] * k4.x + qs[4 * e + 1] * k4.y + qs[4 * e + 2] * k4.z + qs[4 * e + 3] * k4.w;
  }
  return s;
}
template <>
__device__ __forceinline__ float dot64<__nv_bfloat16>(const float* qs, const __nv_bfloat16* kr) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    float f[8];
    bf16x8(__ldg(reinterpret_cast<const uint4*>(kr) + e), f);
#pragma unroll
    for (int x = 0; x < 8; ++x) s += qs[8 * e + x] * f[x];
  }
  return s;
}

__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Two adjacent V dims of one key: the pair a lane accumulates.
__device__ __forceinline__ float2 load_pair(const float* p) { return __ldg(reinterpret_cast<const float2*>(p)); }
__device__ __forceinline__ float2 load_pair(const __nv_bfloat16* p) {
  return __bfloat1622float2(__ldg(reinterpret_cast<const __nv_bfloat162*>(p)));
}

struct AttendArgs {
  const float* q;
  const int32_t* sel;
  int layer, C, H;
  int64_t chunk;
  float scale;
  float *pm, *pl, *pacc;  // [B·H·S], [B·H·S], [B·H·S, 64]
  unsigned* done;         // [B·H] splits finished; zero between steps (the merging block resets it)
  float* out;             // [B, C]
  int fold_gate;          // 1: every block runs the gate itself (no gate_mean_kernel), blocks past B·H update means
  int Kp, mean_blocks_per_row, kv_bf16;
};

// Grid (B·H, S), 128 threads: split `split` of the query's keys (chosen chunks in order, then the own chunk up
// to the query) under an online softmax; 4 warps score 32 keys at a time (a key per lane, 16-byte loads),
// lanes then accumulate V over dims (dims 2·lane, 2·lane + 1). The V rows of a batch's keys are requested
// together with its K rows, so a batch costs one memory round trip. Partial (max, sum, acc) per split; the
// last split of a (row, head) to finish merges the S partials (no separate kernel). The splits are as many as
// fit on the GPU at once (one wave of blocks). (Requesting the own chunk's older rows and each warp's next
// batch into L2 ahead of use was measured: no gain for one stream, slower for batches.)
//
// fold_gate: the gate runs in warp 0 of every block of the (row, head) (the same gate_select: the same choices),
// into shared memory, and blocks x ≥ B·H (split 0) do the chunk-mean updates; the chunk means the gate reads (of
// chunks completed in earlier steps) are prefetched into L2 before the wait.
template <typename KT>
__global__ void __launch_bounds__(128) attend_kernel(const AttendArgs a, const Tabs tb) {
  __shared__ __align__(16) float qs[kHN];
  __shared__ float acc_s[4][kHN], ms[4], ls[4];
  __shared__ int32_t s_sel[kMaxSel];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, S = gridDim.y, split = blockIdx.y;
  const int bt = blockIdx.x;
  if (a.fold_gate && bt >= tb.B * a.H) {
    if (split != 0) return;
    await_previous_kernel();
    const int idx = bt - tb.B * a.H;
    for (int c = threadIdx.x; c < 256; c += blockDim.x)
      chunk_mean_update(tb, a.layer, a.C, a.chunk, a.kv_bf16, idx / a.mean_blocks_per_row,
                        (idx % a.mean_blocks_per_row) * 256 + c);
    return;
  }
  const int b = bt / a.H, h = bt % a.H;
  const int64_t t = tb.pos[b], j = t / a.chunk, off = int64_t(h) * kHN;
  const float* mean = tb.mean[a.layer * tb.B + b];
  if (a.fold_gate && split == 0)
    for (int64_t e = threadIdx.x; e < 2 * j; e += blockDim.x)
      prefetch_l2(mean + (e >> 1) * a.C + off + (e & 1) * 32);
  const KT* K = static_cast<const KT*>(tb.kc[a.layer * tb.B + b]);
  const KT* V = static_cast<const KT*>(tb.vc[a.layer * tb.B + b]);
  await_previous_kernel();
  if (threadIdx.x < kHN) qs[threadIdx.x] = a.q[int64_t(b) * a.C + off + threadIdx.x];
  const int32_t* my = a.sel + int64_t(bt) * kMaxSel;
  int n_sel = 0;  // the choices end at the first −1 (independent loads, one round trip with q)
  auto count_sel = [&]() {
    bool ended = false;
#pragma unroll
    for (int u = 0; u < kMaxSel; ++u) {
      const int32_t c = my[u];
      ended = ended || c < 0;
      n_sel += ended ? 0 : 1;
    }
  };
  if (a.fold_gate) {
    __syncthreads();  // qs
    if (warp == 0) {
      int32_t res[kMaxSel];
      const int n = gate_select<1>(qs, mean, j, a.Kp, a.C, h, lane, res);
      if (lane == 0)
        for (int r = 0; r < kMaxSel; ++r) s_sel[r] = r < n ? res[r] : -1;
    }
    my = s_sel;
    __syncthreads();
    count_sel();
  } else {
    count_sel();
    __syncthreads();
  }
  const int64_t n_keys = int64_t(n_sel) * a.chunk + (t - j * a.chunk + 1);
  const int64_t per = (n_keys + S - 1) / S, k0 = split * per, k1 = min_i64(n_keys, k0 + per);
  float m = -INFINITY, l = 0.f, acc0 = 0.f, acc1 = 0.f;
  for (int64_t base = k0 + int64_t(warp) * 32; base < k1; base += 4 * 32) {
    const int64_t idx = base + lane;
    const bool valid = idx < k1;
    const int n_valid = int(min_i64(32, k1 - base));
    int64_t slot = 0;
    if (valid)
      slot = idx < int64_t(n_sel) * a.chunk ? int64_t(my[idx / a.chunk]) * a.chunk + idx % a.chunk
                                            : j * a.chunk + (idx - int64_t(n_sel) * a.chunk);
    float2 vp[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int64_t si = __shfl_sync(0xffffffffu, slot, i);
      vp[i] = i < n_valid ? load_pair(V + si * a.C + off + 2 * lane) : make_float2(0.f, 0.f);
    }
    const float sc = valid ? dot64<KT>(qs, K + slot * a.C + off) * a.scale : -INFINITY;
    const float m_new = fmaxf(m, warp_max(sc));  // finite: lane 0 of every batch is valid
    const float corr = expf(m - m_new);
    const float p = valid ? expf(sc - m_new) : 0.f;
    l = l * corr + warp_sum(p);
    m = m_new;
    acc0 *= corr, acc1 *= corr;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const float pi = __shfl_sync(0xffffffffu, p, i);
      if (i < n_valid) acc0 += pi * vp[i].x, acc1 += pi * vp[i].y;
    }
  }
  acc_s[warp][2 * lane] = acc0, acc_s[warp][2 * lane + 1] = acc1;
  if (lane == 0) ms[warp] = m, ls[warp] = l;
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < 4; ++w) M = fmaxf(M, ms[w]);
  float L = 0.f, wt[4];
  for (int w = 0; w < 4; ++w) {
    wt[w] = ms[w] == -INFINITY ? 0.f : expf(ms[w] - M);
    L += ls[w] * wt[w];
  }
  const int64_t o = int64_t(bt) * S + split;
  if (threadIdx.x == 0) a.pm[o] = M, a.pl[o] = L;
  if (threadIdx.x < kHN) {
    float s = 0.f;
    for (int w = 0; w < 4; ++w) s += acc_s[w][threadIdx.x] * wt[w];
    a.pacc[o * kHN + threadIdx.x] = s;
  }
  __shared__ bool s_last;
  __threadfence();  // this split's partial is visible before it is counted
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(a.done + bt, 1u) == unsigned(S - 1);
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  // Merge of the S ≤ 64 partials, every load of a kind at once (a few L2 round trips, not S): thread s reads
  // split s's maximum and sum; thread (d, half) sums dim d of the accumulators of every other split.
  __shared__ float s_wt[64], s_mx[4], s_l[4], s_acc[kHN];
  const int64_t p0 = int64_t(bt) * S;
  float mv = -INFINITY, lv = 0.f;
  if (int(threadIdx.x) < S) mv = __ldcg(a.pm + p0 + threadIdx.x), lv = __ldcg(a.pl + p0 + threadIdx.x);
  const float wmax = warp_max(mv);
  if (lane == 0) s_mx[warp] = wmax;
  __syncthreads();
  const float Mx = fmaxf(fmaxf(s_mx[0], s_mx[1]), fmaxf(s_mx[2], s_mx[3]));  // finite: split 0 has keys
  const float wt_s = mv == -INFINITY ? 0.f : expf(mv - Mx);
  if (threadIdx.x < 64) s_wt[threadIdx.x] = wt_s;
  const float lsum = warp_sum(lv * wt_s);
  if (lane == 0) s_l[warp] = lsum;
  __syncthreads();
  const float Lx = (s_l[0] + s_l[1]) + (s_l[2] + s_l[3]);
  const int d = threadIdx.x & (kHN - 1), half = threadIdx.x >> 6;
  float acc = 0.f;
#pragma unroll 16
  for (int s = half; s < S; s += 2) acc += __ldcg(a.pacc + (p0 + s) * kHN + d) * s_wt[s];
  if (half == 1) s_acc[d] = acc;
  __syncthreads();
  if (half == 0) a.out[int64_t(b) * a.C + off + d] = (acc + s_acc[d]) / Lx;
  if (threadIdx.x == 0) a.done[bt] = 0;
}

template <typename T>
__global__ void transpose_kernel(const T* src, int64_t rows, int64_t cols, T* dst) {  // dst [cols, rows]
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * cols; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    dst[c * rows + r] = src[i];
  }
}

using GemvFn = void (*)(GemvArgs, Tabs);
struct GemvVariant {
  GemvFn fn;
  int loads, rw, rows;  // rows ≤ 0: gemv_row_kernel (B = 1, K ≤ loads·256), 0 with kLn, −1 without
};
const GemvVariant kGemvVariants[] = {
    {gemv_row_kernel<3, 1, true>, 3, 1, 0},   {gemv_row_kernel<3, 2, true>, 3, 2, 0},   {gemv_row_kernel<3, 4, true>, 3, 4, 0},
    {gemv_row_kernel<3, 1, false>, 3, 1, -1}, {gemv_row_kernel<3, 2, false>, 3, 2, -1}, {gemv_row_kernel<3, 4, false>, 3, 4, -1},
    {gemv_row_kernel<12, 1, false>, 12, 1, -1}, {gemv_row_kernel<12, 2, false>, 12, 2, -1},
    {gemv_kernel<3, 1, 1>, 3, 1, 1},       {gemv_kernel<3, 4, 1>, 3, 4, 1},       {gemv_kernel<12, 1, 1>, 12, 1, 1},
    {gemv_kernel<3, 2, kRT>, 3, 2, kRT},   {gemv_kernel<3, 4, kRT>, 3, 4, kRT},   {gemv_kernel<12, 2, kRT>, 12, 2, kRT},
};

int is_bf16(const Tensor& t) { return t.dtype == DType::bf16 ? 1 : 0; }
const float* fp(const Tensor& t) { return static_cast<const float*>(t.data); }

class CudaStepDecoder final : public StepDecoder {
 public:
  CudaStepDecoder(CudaBackend& be, const ModelConfig& cfg, const ModelWeights& w, bool graph)
      : be_(be), c_(cfg), w_(w), graph_(graph) {
    for (const RwkvBlockWeights& b : w.rwkv) {
      Lora l;
      l.w1t = transposed(b.att.w1), l.w2t = transposed(b.att.w2);
      l.a1t = transposed(b.att.a1), l.a2t = transposed(b.att.a2);
      l.g1t = transposed(b.att.g1), l.g2t = transposed(b.att.g2);
      if (!b.att.v1.empty()) l.v1t = transposed(b.att.v1), l.v2t = transposed(b.att.v2);
      lora_.push_back(std::move(l));
    }
    const int64_t C = c_.n_embd, F = c_.n_ffn;
    if (const char* e = std::getenv("RWKVX_DECODE_GATE_FOLD"); e && *e) fold_gate_ = std::atoi(e) != 0;
    if (const char* e = std::getenv("RWKVX_DECODE_PROBE"); e && *e) probe_ = std::atoi(e);
    gemv_smem_ = gemv_smem_bytes(C, F);
    for (const GemvVariant& v : kGemvVariants)
      if (v.rows > 0)
        RWKVX_CUDA_CHECK(cudaFuncSetAttribute(v.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(gemv_smem_)));
    if (probe_) RWKVX_CUDA_CHECK(cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(gemv_smem_)));
    be_.synchronize();
  }
  ~CudaStepDecoder() override {
    for (auto& [n, b] : bufs_)
      if (b.exec) cudaGraphExecDestroy(b.exec);
    for (HostBlob& hb : host_blob_) {
      if (hb.uploaded) cudaEventDestroy(hb.uploaded);
      if (hb.p) cudaFreeHost(hb.p);
    }
  }

  // Shapes this decoder handles (others decode op by op).
  // Largest GEMV shared memory: a tile's rows of LayerNorm(x) and shift deltas + LayerNorm weight and bias
  // (K = C), or a tile's rows of the FFN hidden layer (K = F).
  static size_t gemv_smem_bytes(int64_t C, int64_t F) {
    return size_t(std::max<int64_t>((2 * kRT + 2) * C, kRT * F)) * 4;
  }
  static bool supports(const ModelConfig& c, const ModelWeights& w, const cudaDeviceProp& prop) {
    const int64_t C = c.n_embd, F = c.n_ffn;
    if (c.head_size != kHN || C % kHN != 0 || C % 8 != 0 || F % 8 != 0) return false;
    if (c.n_sparse > 0 && (c.sparse.head_dim != kHN || c.sparse.top_k - 1 > kMaxSel || c.sparse.chunk <= 0)) return false;
    if (c.eviction.max_len > 0) return false;
    if (gemv_smem_bytes(C, F) > size_t(prop.sharedMemPerBlockOptin)) return false;
    auto ok = [](const Tensor& t) { return t.dtype == DType::f32 || t.dtype == DType::bf16; };
    if (!ok(w.emb) || !ok(w.head)) return false;
    for (const RwkvBlockWeights& b : w.rwkv) {
      const TimeMixWeights& a = b.att;
      for (const Tensor* t : {&a.receptance, &a.key, &a.value, &a.output, &b.ffn.key, &b.ffn.value})
        if (!ok(*t)) return false;
      // The head kernel reads the second LoRA stages with one dtype flag.
      const DType d = a.w2.dtype;
      if (a.a2.dtype != d || a.g2.dtype != d || (!a.v2.empty() && a.v2.dtype != d) || !ok(a.w2)) return false;
      for (const Tensor* t : {&a.w1, &a.a1, &a.g1}) if (!ok(*t)) return false;
      if (!a.v1.empty() && !ok(a.v1)) return false;
    }
    for (const SparseBlockWeights& b : w.sparse)
      for (const Tensor* t : {&b.query, &b.key, &b.value, &b.output, &b.ffn.key, &b.ffn.value})
        if (!ok(*t)) return false;
    return true;
  }

  bool step(const int32_t* ids, const SeqBatch& batch, State& state, Tensor& logits) override {
    const int B = int(batch.n_seq());
    if (B == 0) return false;
    for (int s = 0; s < B; ++s)
      if (batch.row_start[size_t(s) + 1] - batch.row_start[size_t(s)] != 1) return false;
    const int S = int(c_.n_sparse);
    for (int m = 0; m < S; ++m)
      for (int s = 0; s < B; ++s) {
        const KvCache& kc = state.kv[size_t(m)][size_t(batch.slot[size_t(s)])];
        const KvCache& k0 = state.kv[0][size_t(batch.slot[size_t(s)])];
        if (kc.len != k0.len) return false;
        if ((kc.k.empty() ? kc.dtype : kc.k.dtype) != c_.kv_dtype) return false;
        if (kc.len > 0 && kc.chunk != c_.sparse.chunk) return false;
      }
    be_.drop_prefill_scratch();
    for (int m = 0; m < S; ++m)
      for (int s = 0; s < B; ++s) grow(state.kv[size_t(m)][size_t(batch.slot[size_t(s)])]);

    Bufs& bb = bufs_for(B);
    // One stream: the head kernel writes the logits straight into the tensor the step returns (its address is in
    // the tables); otherwise they are copied there from the decoder's buffer after the step.
    logits = be_.alloc_uninit(DType::f32, {B, c_.n_vocab});  // NaN-poisoned when the backend is asked to
    // Parameter blob (layout as in Bufs::tabs), written into pinned host memory (a cheaper upload than from
    // pageable memory); two buffers in turn, each reused once its previous upload has been done.
    HostBlob& h = host_blob_[blob_turn_];
    blob_turn_ ^= 1;
    if (h.uploaded) RWKVX_CUDA_CHECK(cudaEventSynchronize(h.uploaded));
    else RWKVX_CUDA_CHECK(cudaEventCreateWithFlags(&h.uploaded, cudaEventDisableTiming));
    if (h.cap < bb.blob_bytes) {
      if (h.p) RWKVX_CUDA_CHECK(cudaFreeHost(h.p));
      h.p = nullptr, h.cap = 0;
      RWKVX_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&h.p), bb.blob_bytes));
      h.cap = bb.blob_bytes;
    }
    std::memset(h.p, 0, bb.blob_bytes);
    auto put = [&](size_t off, const void* p, size_t n) { std::memcpy(h.p + off, p, n); };
    for (int s = 0; s < B; ++s) {
      const int32_t slot = batch.slot[size_t(s)];
      put(bb.off_ids + 4 * size_t(s), ids + s, 4);
      put(bb.off_slot + 4 * size_t(s), &slot, 4);
      const int64_t pos = S > 0 ? state.kv[0][size_t(slot)].len : state.pos[size_t(slot)];
      put(bb.off_pos + 8 * size_t(s), &pos, 8);
      for (int m = 0; m < S; ++m) {
        KvCache& kc = state.kv[size_t(m)][size_t(slot)];
        const size_t e = 8 * (size_t(m) * size_t(B) + size_t(s));
        put(bb.off_kc + e, &kc.k.data, 8);
        put(bb.off_vc + e, &kc.v.data, 8);
        put(bb.off_mean + e, &kc.chunk_mean.data, 8);
      }
    }
    for (int64_t i = 0; i < c_.n_rwkv; ++i) {
      put(bb.off_att + 8 * size_t(i), &state.att_shift[size_t(i)].data, 8);
      put(bb.off_wkv + 8 * size_t(i), &state.wkv[size_t(i)].data, 8);
    }
    for (int64_t i = 0; i < c_.n_rwkv + c_.n_sparse; ++i) put(bb.off_ffn + 8 * size_t(i), &state.ffn_shift[size_t(i)].data, 8);
    put(bb.off_logits, &logits.data, 8);
    RWKVX_CUDA_CHECK(cudaMemcpyAsync(bb.blob.data, h.p, bb.blob_bytes, cudaMemcpyHostToDevice, be_.stream()));
    RWKVX_CUDA_CHECK(cudaEventRecord(h.uploaded, be_.stream()));

    if (graph_) {
      if (!bb.exec) {
        cudaGraph_t g = nullptr;
        RWKVX_CUDA_CHECK(cudaStreamBeginCapture(be_.stream(), cudaStreamCaptureModeThreadLocal));
        try {
          enqueue(bb);
        } catch (...) {
          cudaStreamEndCapture(be_.stream(), &g);
          if (g) cudaGraphDestroy(g);
          throw;
        }
        RWKVX_CUDA_CHECK(cudaStreamEndCapture(be_.stream(), &g));
        const cudaError_t e = cudaGraphInstantiate(&bb.exec, g, 0);
        cudaGraphDestroy(g);
        RWKVX_CUDA_CHECK(e);
      }
      RWKVX_CUDA_CHECK(cudaGraphLaunch(bb.exec, be_.stream()));
    } else {
      enqueue(bb);
    }
    for (int m = 0; m < S; ++m)
      for (int s = 0; s < B; ++s) {
        KvCache& kc = state.kv[size_t(m)][size_t(batch.slot[size_t(s)])];
        kc.len += 1;
        kc.n_chunks = kc.len / kc.chunk;
      }
    if (!head_in_place(B))
      RWKVX_CUDA_CHECK(cudaMemcpyAsync(logits.data, bb.logits.data, logits.nbytes(), cudaMemcpyDeviceToDevice, be_.stream()));
    return true;
  }

 private:
  struct Lora {
    Tensor w1t, w2t, a1t, a2t, g1t, g2t, v1t, v2t;
  };
  struct Bufs {
    int B = 0, S = 1;
    Tensor x, xsave, xsave2, r, k, v, hw, ha, hg, hv, vfirst, y, hbuf, q, o, sel, part, done, logits, blob;
    size_t blob_bytes = 0, off_ids = 0, off_slot = 0, off_pos = 0, off_att = 0, off_wkv = 0, off_ffn = 0, off_kc = 0,
           off_vc = 0, off_mean = 0, off_logits = 0;
    cudaGraphExec_t exec = nullptr;
    Tabs tabs{};
  };

  Tensor transposed(const Tensor& W) {  // [R, Cc] → [Cc, R], same dtype
    const int64_t R = W.rows(), Cc = W.row_size();
    Tensor t = be_.alloc(W.dtype, {Cc, R});
    const unsigned g = std::min<unsigned>(grid_for(R * Cc, 256), 65536u);
    if (W.dtype == DType::bf16)
      transpose_kernel<<<g, 256, 0, be_.stream()>>>(static_cast<const __nv_bfloat16*>(W.data), R, Cc,
                                                    static_cast<__nv_bfloat16*>(t.data));
    else
      transpose_kernel<<<g, 256, 0, be_.stream()>>>(static_cast<const float*>(W.data), R, Cc, static_cast<float*>(t.data));
    RWKVX_CUDA_LAUNCHED();
    return t;
  }

  // Room for one more row (capacity doubling, rounded to whole chunks, as kv_append does).
  void grow(KvCache& cache) {
    const int64_t C = c_.n_embd, chunk = c_.sparse.chunk;
    if (!cache.k.empty()) cache.dtype = cache.k.dtype;
    cache.chunk = chunk;
    const int64_t need = cache.len + 1, cap = cache.k.empty() ? 0 : cache.k.rows();
    if (need <= cap && !cache.chunk_mean.empty() && cache.chunk_mean.rows() * chunk >= need) return;
    be_.grow_kv_cache(cache, std::max<int64_t>(need, 2 * cap), C, int(chunk));
  }

  Tensor buf(size_t floats) {
    Tensor t = be_.scratch(std::max<size_t>(floats, 1) * 4);
    RWKVX_CUDA_CHECK(cudaMemsetAsync(t.data, 0xff, std::max<size_t>(floats, 1) * 4, be_.stream()));  // NaN poison
    return t;
  }

  Bufs& bufs_for(int B) {
    auto it = bufs_.find(B);
    if (it != bufs_.end()) return it->second;
    Bufs& b = bufs_[B];
    const size_t Bz = size_t(B), C = size_t(c_.n_embd), F = size_t(c_.n_ffn), H = C / kHN;
    b.B = B;
    for (Tensor* t : {&b.x, &b.xsave, &b.xsave2, &b.r, &b.k, &b.v, &b.vfirst, &b.y, &b.q, &b.o}) *t = buf(Bz * C);
    b.hw = buf(Bz * size_t(c_.dim_w)), b.ha = buf(Bz * size_t(c_.dim_a)), b.hg = buf(Bz * size_t(c_.dim_g));
    b.hv = buf(Bz * size_t(std::max<int64_t>(c_.dim_v, 1)));
    b.hbuf = buf(Bz * F);
    if (!head_in_place(B)) b.logits = buf(Bz * size_t(c_.n_vocab));  // copied into each step's tensor
    if (c_.n_sparse > 0) {
      const int64_t max_keys = int64_t(c_.sparse.top_k) * c_.sparse.chunk;
      int64_t S = std::clamp<int64_t>((max_keys + 127) / 128, 1, 64);  // a split's keys: one batch per warp
      // No more splits than fit on the GPU at once: one wave of blocks, no tail wave.
      int occ = 0;
      RWKVX_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &occ, c_.kv_dtype == DType::bf16 ? attend_kernel<__nv_bfloat16> : attend_kernel<float>, 128, 0));
      const int64_t fill = int64_t(be_.sm_count()) * std::max(occ, 1) / int64_t(Bz * H);
      b.S = int(std::max<int64_t>(1, std::min(S, fill)));
      b.sel = buf(Bz * H * kMaxSel);
      b.part = buf(Bz * H * size_t(b.S) * (kHN + 2));
      b.done = be_.scratch(Bz * H * 4);
      RWKVX_CUDA_CHECK(cudaMemsetAsync(b.done.data, 0, Bz * H * 4, be_.stream()));
    }
    const size_t L = size_t(c_.n_rwkv), M = size_t(c_.n_sparse);
    size_t off = 0;
    auto take = [&](size_t n) {
      const size_t o = off;
      off = (off + n + 7) / 8 * 8;
      return o;
    };
    b.off_ids = take(4 * Bz), b.off_slot = take(4 * Bz), b.off_pos = take(8 * Bz);
    b.off_att = take(8 * std::max<size_t>(L, 1)), b.off_wkv = take(8 * std::max<size_t>(L, 1));
    b.off_ffn = take(8 * (L + M)), b.off_kc = take(8 * std::max<size_t>(M * Bz, 1));
    b.off_vc = take(8 * std::max<size_t>(M * Bz, 1)), b.off_mean = take(8 * std::max<size_t>(M * Bz, 1));
    b.off_logits = take(8);
    b.blob_bytes = off;
    b.blob = be_.scratch(off);
    auto* base = static_cast<uint8_t*>(b.blob.data);
    b.tabs.ids = reinterpret_cast<const int32_t*>(base + b.off_ids);
    b.tabs.slot = reinterpret_cast<const int32_t*>(base + b.off_slot);
    b.tabs.pos = reinterpret_cast<const int64_t*>(base + b.off_pos);
    b.tabs.att_shift = reinterpret_cast<float* const*>(base + b.off_att);
    b.tabs.wkv = reinterpret_cast<float* const*>(base + b.off_wkv);
    b.tabs.ffn_shift = reinterpret_cast<float* const*>(base + b.off_ffn);
    b.tabs.kc = reinterpret_cast<void* const*>(base + b.off_kc);
    b.tabs.vc = reinterpret_cast<void* const*>(base + b.off_vc);
    b.tabs.mean = reinterpret_cast<float* const*>(base + b.off_mean);
    b.tabs.logits = reinterpret_cast<float* const*>(base + b.off_logits);
    b.tabs.B = B;
    return b;
  }

  // ---- the step's kernels ----
  struct Gemv {
    GemvArgs a{};
  };
  static Gemv ln_gemv(const Tensor& x, const LayerNormWeights& ln, int K) {
    Gemv g;
    g.a.K = K, g.a.x = fp(x), g.a.ln_w = fp(ln.weight), g.a.ln_b = fp(ln.bias);
    return g;
  }
  static Gemv buf_gemv(const Tensor& in, int K) {
    Gemv g;
    g.a.K = K, g.a.in = fp(in);
    return g;
  }
  static void job(Gemv& g, const Tensor& W, const Tensor* mu, float* out, int ldo, int epi, int layer = 0) {
    RWKVX_ASSERT(g.a.n_jobs < kMaxJobs, "gemv: too many jobs");
    GemvJob& j = g.a.job[g.a.n_jobs++];
    j.W = W.data, j.bf16 = is_bf16(W), j.N = int(W.rows()), j.mu = mu ? fp(*mu) : nullptr;
    j.out = out, j.ldo = ldo, j.epi = epi, j.layer = layer;
    RWKVX_ASSERT(W.row_size() == g.a.K, "gemv: weight " + W.shape_str() + " does not take K inputs");
  }
  // Variant: 3 pieces per lane for K ≤ 768 (a whole row in flight), else 12 (K > 3072 loops over chunks).
  // Single stream: the register-resident row kernel with the fewest rows per warp that still puts every
  // task's weights in flight at once (all warps resident); the tall head gets 4 rows per warp and a
  // persistent grid. Batches: 8 rows per tile, 2 or 4 matrix rows per warp (below).
  void run(Gemv& g, const Bufs& b) {
    g.a.C = int(c_.n_embd);
    g.a.kv_bf16 = c_.kv_dtype == DType::bf16;
    bool mix = false;
    int64_t rows = 0;
    for (int i = 0; i < g.a.n_jobs; ++i) mix = mix || g.a.job[i].mu, rows += g.a.job[i].N;
    RWKVX_ASSERT(mix == (g.a.in == nullptr && g.a.shift_kind != 0), "gemv: mixes need the shift rows");
    const int loads = g.a.K <= 768 ? 3 : 12;
    auto count_tasks = [&](int rw) {
      int64_t n = 0;
      for (int i = 0; i < g.a.n_jobs; ++i) n += (g.a.job[i].N + rw - 1) / rw;
      return n;
    };
    const GemvVariant* v = nullptr;
    size_t smem = 0;
    int tile = 1;
    const bool ln = g.a.in == nullptr;
    if (b.B == 1 && g.a.K <= (ln ? 3 : 12) * 256) {
      for (const GemvVariant& c : kGemvVariants) {
        if (c.rows != (ln ? 0 : -1) || c.loads != loads) continue;
        v = &c;  // listed by increasing rows per warp
        if (count_tasks(c.rw) <= int64_t(be_.sm_count()) * blocks_per_sm(c.fn, 0) * kGemvWarps) break;
      }
    } else {
      tile = b.B == 1 ? 1 : kRT;
      // Batches: a warp streams 2 matrix rows (one tile: enough tasks to fill the GPU), or 4 once there are
      // several tiles (12 pieces a lane × 4 rows would spill: 2). More weight bytes in flight per warp: the
      // weights are re-read once per tile, and with one row per warp those reads were latency-bound (RWKV-X
      // 0.2B on an H100: batch 8 / 64 / 256 2.00 / 7.6 / 25.2 → 1.77 / 5.06 / 16.6 ms per step).
      const int rw = b.B == 1 ? (loads == 3 && rows >= 16384 ? 4 : 1) : (b.B <= kRT || loads == 12 ? 2 : 4);
      for (const GemvVariant& c : kGemvVariants)
        if (c.loads == loads && c.rw == rw && c.rows == tile) v = &c;
      smem = (size_t(std::min(tile, b.B)) * (mix ? 2 : 1) + (g.a.in ? 0 : 2)) * size_t(g.a.K) * 4;
    }
    RWKVX_ASSERT(v, "gemv: no kernel variant");
    RWKVX_ASSERT(smem <= gemv_smem_, "gemv: shared memory");
    g.a.n_tasks = 0;
    for (int i = 0; i < g.a.n_jobs; ++i) {
      g.a.job[i].task0 = g.a.n_tasks;
      g.a.n_tasks += (g.a.job[i].N + v->rw - 1) / v->rw;
    }
    const unsigned tiles = unsigned((b.B + tile - 1) / tile);
    const int64_t resident = int64_t(be_.sm_count()) * blocks_per_sm(v->fn, smem) / int64_t(tiles);
    const int64_t want = (g.a.n_tasks + kGemvWarps - 1) / kGemvWarps;
    const unsigned blocks = unsigned(std::max<int64_t>(1, std::min(want, resident)));
    launch(v->fn, dim3(blocks, tiles), dim3(kGemvWarps * 32), smem, g.a, b.tabs);
  }
  int blocks_per_sm(GemvFn fn, size_t smem) {
    auto [it, fresh] = occupancy_.try_emplace({fn, smem}, 0);
    if (fresh) RWKVX_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&it->second, fn, kGemvWarps * 32, smem));
    RWKVX_ASSERT(it->second > 0, "gemv: kernel does not fit on a multiprocessor");
    return it->second;
  }
  // Every kernel but a step's first may start while its predecessor runs (see await_previous_kernel).
  template <typename... P, typename... A>
  void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
    launch_with(true, kernel, grid, block, smem, std::forward<A>(args)...);
  }
  template <typename... P, typename... A>
  void launch_with(bool overlap_previous, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem, cfg.stream = be_.stream();
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = &attr, cfg.numAttrs = overlap_previous ? 1 : 0;
    if (probe_ && (probe_ & probe_kind(reinterpret_cast<const void*>(kernel)))) RWKVX_CUDA_CHECK(cudaLaunchKernelEx(&cfg, probe_kernel));
    else RWKVX_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...));
  }
  static int probe_kind(const void* fn) {
    for (const GemvVariant& v : kGemvVariants)
      if (fn == reinterpret_cast<const void*>(v.fn)) return 1 | 2;
    if (fn == reinterpret_cast<const void*>(rwkv_head_kernel)) return 1 | 4;
    if (fn == reinterpret_cast<const void*>(attend_kernel<float>) || fn == reinterpret_cast<const void*>(attend_kernel<__nv_bfloat16>) ||
        fn == reinterpret_cast<const void*>(gate_mean_kernel))
      return 1 | 8;
    if (fn == reinterpret_cast<const void*>(head_kernel<4>)) return 1 | 16;
    if (fn == reinterpret_cast<const void*>(embed_kernel)) return 1 | 32;
    return 1;
  }

  void ffn(const Bufs& b, const ChannelMixWeights& w, const LayerNormWeights& ln2, int idx) {
    const int C = int(c_.n_embd), F = int(c_.n_ffn);
    Gemv k = ln_gemv(b.x, ln2, C);
    k.a.shift_kind = 2, k.a.shift_layer = idx, k.a.save_xn = const_cast<float*>(fp(b.xsave2));
    job(k, w.key, &w.x_k, const_cast<float*>(fp(b.hbuf)), F, kRelu2);
    run(k, b);
    Gemv v = buf_gemv(b.hbuf, F);
    v.a.copy_src = fp(b.xsave2), v.a.copy_layer = idx;
    job(v, w.value, nullptr, const_cast<float*>(fp(b.x)), C, kAdd);
    run(v, b);
  }

  void enqueue(const Bufs& b) {
    const int C = int(c_.n_embd), H = C / kHN, B = b.B;
    auto mp = [](const Tensor& t) { return const_cast<float*>(fp(t)); };
    launch_with(false, embed_kernel, dim3(unsigned(B)), dim3(256), size_t(C) * 4, w_.emb.data, is_bf16(w_.emb), C,
                fp(w_.ln0.weight), fp(w_.ln0.bias), b.tabs, mp(b.x));
    for (const BlockRef& ref : c_.exec_order) {
      if (ref.kind == BlockRef::Kind::rwkv) {
        const int i = ref.index;
        const RwkvBlockWeights& bw = w_.rwkv[size_t(i)];
        const TimeMixWeights& a = bw.att;
        const Lora& lo = lora_[size_t(i)];
        const bool first = i == 0;
        Gemv p = ln_gemv(b.x, bw.ln1, C);
        p.a.shift_kind = 1, p.a.shift_layer = i, p.a.save_xn = mp(b.xsave);
        job(p, a.receptance, &a.x_r, mp(b.r), C, kStore);
        job(p, a.key, &a.x_k, mp(b.k), C, kStore);
        job(p, a.value, &a.x_v, mp(b.v), C, kStore);
        job(p, lo.w1t, &a.x_w, mp(b.hw), int(c_.dim_w), kTanh);
        job(p, lo.a1t, &a.x_a, mp(b.ha), int(c_.dim_a), kStore);
        job(p, lo.g1t, &a.x_g, mp(b.hg), int(c_.dim_g), kSigmoid);
        if (!first) job(p, lo.v1t, &a.x_v, mp(b.hv), int(c_.dim_v), kStore);
        run(p, b);
        HeadArgs h{};
        h.r = fp(b.r), h.k = fp(b.k), h.v = fp(b.v), h.hw = fp(b.hw), h.ha = fp(b.ha), h.hg = fp(b.hg), h.hv = fp(b.hv);
        h.vfirst = mp(b.vfirst), h.first = first;
        h.w2t = lo.w2t.data, h.a2t = lo.a2t.data, h.g2t = lo.g2t.data, h.v2t = first ? nullptr : lo.v2t.data;
        h.bf16 = is_bf16(lo.w2t);
        h.dw = int(c_.dim_w), h.da = int(c_.dim_a), h.dg = int(c_.dim_g), h.dv = first ? 0 : int(c_.dim_v);
        h.w0 = fp(a.w0), h.a0 = fp(a.a0), h.v0 = first ? nullptr : fp(a.v0), h.k_k = fp(a.k_k), h.k_a = fp(a.k_a);
        h.r_k = fp(a.r_k), h.ln_w = fp(a.ln_x.weight), h.ln_b = fp(a.ln_x.bias);
        h.xsave = fp(b.xsave), h.layer = i, h.y = mp(b.y), h.C = C;
        const size_t smem = size_t(h.dw + h.da + h.dg + std::max(h.dv, 0)) * 4;
        launch(rwkv_head_kernel, dim3(unsigned(B * H)), dim3(256), smem, h, b.tabs);
        Gemv o = buf_gemv(b.y, C);
        job(o, a.output, nullptr, mp(b.x), C, kAdd);
        run(o, b);
        ffn(b, bw.ffn, bw.ln2, i);
      } else {
        const int m = ref.index;
        const SparseBlockWeights& sw = w_.sparse[size_t(m)];
        Gemv p = ln_gemv(b.x, sw.ln1, C);
        job(p, sw.query, nullptr, mp(b.q), C, kStore);
        job(p, sw.key, nullptr, nullptr, C, kKvK, m);
        job(p, sw.value, nullptr, nullptr, C, kKvV, m);
        run(p, b);
        GateArgs g{};
        g.q = fp(b.q), g.layer = m, g.C = C, g.H = H, g.Kp = std::max(0, c_.sparse.top_k - 1);
        g.chunk = c_.sparse.chunk, g.sel = static_cast<int32_t*>(b.sel.data), g.kv_bf16 = c_.kv_dtype == DType::bf16;
        g.gate_blocks = (B * H + 7) / 8, g.mean_blocks_per_row = (C + 255) / 256;
        const bool fold = fold_gate_ && B == 1;
        if (!fold)
          launch(gate_mean_kernel, dim3(unsigned(g.gate_blocks + B * g.mean_blocks_per_row)), dim3(256), 0, g, b.tabs);
        AttendArgs at{};
        at.fold_gate = fold, at.Kp = g.Kp, at.mean_blocks_per_row = g.mean_blocks_per_row, at.kv_bf16 = g.kv_bf16;
        float* pm = mp(b.part);
        const size_t n = size_t(B) * size_t(H) * size_t(b.S);
        at.q = fp(b.q), at.sel = static_cast<const int32_t*>(b.sel.data), at.layer = m, at.C = C, at.H = H;
        at.chunk = c_.sparse.chunk, at.scale = 1.0f / std::sqrt(float(kHN)), at.pm = pm, at.pl = pm + n, at.pacc = pm + 2 * n;
        at.done = static_cast<unsigned*>(b.done.data), at.out = mp(b.o);
        const unsigned mean_blocks = fold ? unsigned(B * g.mean_blocks_per_row) : 0u;
        launch(c_.kv_dtype == DType::bf16 ? attend_kernel<__nv_bfloat16> : attend_kernel<float>,
               dim3(unsigned(B * H) + mean_blocks, unsigned(b.S)), dim3(128), 0, at, b.tabs);
        Gemv o = buf_gemv(b.o, C);
        job(o, sw.output, nullptr, mp(b.x), C, kAdd);
        run(o, b);
        ffn(b, sw.ffn, sw.ln2, int(c_.n_rwkv) + m);
      }
    }
    Gemv hd = ln_gemv(b.x, w_.ln_out, C);
    job(hd, w_.head, nullptr, mp(b.logits), int(c_.n_vocab), kStore);  // head_kernel: into the tensor in the tables
    if (head_in_place(B)) run_head(hd, b);
    else run(hd, b);
  }
  // The single-stream head: head_kernel over every resident block, writing the step's logits tensor in place.
  bool head_in_place(int B) const { return B == 1 && is_bf16(w_.head) && c_.n_embd <= 768; }
  void run_head(Gemv& g, const Bufs& b) {
    constexpr int rw = 4;
    GemvFn fn = head_kernel<rw>;
    g.a.C = int(c_.n_embd);
    g.a.job[0].task0 = 0;
    g.a.n_tasks = (g.a.job[0].N + rw - 1) / rw;
    const int64_t resident = int64_t(be_.sm_count()) * blocks_per_sm(fn, 0);
    const int64_t want = (g.a.n_tasks + kGemvWarps - 1) / kGemvWarps;
    launch(fn, dim3(unsigned(std::max<int64_t>(1, std::min(want, resident)))), dim3(kGemvWarps * 32), 0, g.a, b.tabs);
  }

  CudaBackend& be_;
  const ModelConfig& c_;
  const ModelWeights& w_;
  bool graph_;
  bool fold_gate_ = true;   // one stream: the gate in the attention kernel; RWKVX_DECODE_GATE_FOLD=0: its own kernel
  // Measurement only. RWKVX_DECODE_PROBE: probe_kernel instead of the kernels of a kind (bits: 1 all, 2 the
  // GEMVs, 4 rwkv_head_kernel, 8 attention and gate, 16 head_kernel, 32 embed_kernel): the step's time without
  // their work (the logits are then wrong).
  int probe_ = 0;
  size_t gemv_smem_ = 0;
  std::map<std::pair<GemvFn, size_t>, int> occupancy_;
  std::vector<Lora> lora_;
  std::map<int, Bufs> bufs_;
  struct HostBlob {
    uint8_t* p = nullptr;  // pinned
    size_t cap = 0;
    cudaEvent_t uploaded = nullptr;  // recorded after its last upload
  };
  HostBlob host_blob_[2];
  int blob_turn_ = 0;
};

}  // namespace

std::unique_ptr<StepDecoder> CudaBackend::make_step_decoder(const ModelConfig& cfg, const ModelWeights& w) {
  if (!opt_.step_decoder) return nullptr;
  cudaDeviceProp prop{};
  RWKVX_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
  if (!CudaStepDecoder::supports(cfg, w, prop)) return nullptr;
  return std::make_unique<CudaStepDecoder>(*this, cfg, w, opt_.decode_graph);
}

}  // namespace rwkvx::cuda
