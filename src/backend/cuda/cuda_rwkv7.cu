// CUDA kernels for the RWKV-7 time-mix ops (spec model.md §3): the fused per-head elementwise steps and
// the WKV-7 recurrence.
//
// WKV-7 recurrence, per (sequence, head): every value row i of the state evolves on its own,
//   s_i ← s_i · G_t + v_i k_tᵀ,  G_t = diag(w_t) + α_t β_tᵀ   (sa_i = s_i·α reads row i only),
// and y_i = s_i · r_t. The sequential kernel below walks a sequence's rows in order: 4 lanes share each
// row (N/4 state columns each, in registers) and reduce sa_i and y_i with two shuffles; the per-token vectors
// r, w, k, α, β are staged in shared memory 16 tokens at a time (8 for N = 128) by cp.async, double-buffered. For decode and
// short prefills a block owns 16 rows of one (sequence, head), one row per lane, but a long sequence is then
// latency-bound (≈0.5 µs per token step, one step after the other).
//
// Long sequences run segment-parallel instead, in three launches:
//  1. transitions: every segment of L rows runs the same recurrence at once from a zero state (giving E,
//     the state it would end with from zero) and, in N more rows with v = 0 started from the identity, the
//     product of its G_t (P, so that a segment started from S ends at S·P + E);
//  2. chain: per (sequence, head) and group of state rows, one block walks the segments:
//     start_{j+1} = start_j · P_j + E_j;
//  3. outputs: every segment runs the sequential kernel again from its start state, writing y.
// This does ≈3× the arithmetic of the sequential walk, but with ~L× the parallelism; results equal it to
// fp32 rounding. Passes 1 and 3 give each lane several rows (RT), so every staged input serves RT
// multiply-adds and arithmetic, not shared-memory reads, bounds them. Head sizes other than 32/64/128, or
// unaligned rows, use a plain kernel with the state in global memory.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/tensor_core.cuh"

namespace rwkvx::cuda {
namespace {

// Lane g of a row's 4 lanes owns the state columns (jj / 4)·16 + 4g + jj % 4, jj < N/4: its 16-byte
// shared-memory reads then hit 4 different bank groups across the 4 lanes (no conflicts).
template <int N>
__device__ __forceinline__ int wkv_column(int g, int jj) {
  return (jj / 4) * 16 + g * 4 + (jj % 4);
}

// kTransitions = false: the sequential recurrence; sequence s reads/writes its state at slot bt.slot[s].
// kTransitions = true: step 1 above; "sequence" s is a segment, rows 0..N-1 of its 2N-row output at slot
// bt.slot[s] are E, rows N..2N-1 are P; a segment with slot < 0 (the last of its sequence) is skipped.
// A block owns RB value rows of one (sequence, head); 4 lanes share each group of RT rows, every lane holding
// N/4 state columns of each of its RT rows in registers. RT > 1 reuses each staged input for RT rows: with
// one row per lane the kernel is bound by shared-memory reads (one per multiply-add), which is right for
// short, latency-bound calls, while the segment passes have enough rows to be bound by arithmetic. The
// per-token vectors r, w, k, α, β and the block's values are staged TT tokens at a time with cp.async into
// two buffers, so the next tile loads while this one is computed.
template <int N, int RB, int RT, bool kTransitions>
__global__ void __launch_bounds__(RB / RT * 4) wkv7_kernel(const float* __restrict__ r, const float* __restrict__ w,
                                                           const float* __restrict__ k, const float* __restrict__ v,
                                                           const float* __restrict__ al, const float* __restrict__ be,
                                                           float* __restrict__ state, DeviceBatch bt, int64_t C, int H,
                                                           float* __restrict__ y) {
  using tensor_core::cp_async16;
  constexpr int G = 4, J = N / G, TT = N >= 128 ? 8 : 16, ROWS = kTransitions ? 2 * N : N, NB = ROWS / RB,
                N4 = N / 4, NT = RB / RT * G, kVecs = kTransitions ? 4 : 5;  // transitions do not read r
  static_assert(ROWS % RB == 0 && RB % (4 * RT) == 0 && RT <= G && J % 4 == 0, "wkv7_kernel: bad tiling");
  __shared__ __align__(16) float sin[2][kVecs][TT][N];  // w, k, α, β, r
  __shared__ __align__(16) float sv[2][TT][RB];
  const int s = blockIdx.x / (H * NB), h = (blockIdx.x / NB) % H, i0 = (blockIdx.x % NB) * RB;
  const int tid = threadIdx.x, rg = tid / G, g = tid % G;
  const int64_t r0 = bt.row_start[s], r1 = bt.row_start[s + 1];
  if (r1 <= r0 || bt.slot[s] < 0) return;
  const bool identity_rows = kTransitions && i0 >= N;  // P rows: v = 0, start from e_(i-N)
  float* S = state + (int64_t(bt.slot[s]) * H + h) * ROWS * N;
  float st[RT][J];
#pragma unroll
  for (int q = 0; q < RT; ++q) {
    const int i = i0 + rg * RT + q;
#pragma unroll
    for (int jj = 0; jj < J; ++jj) {
      const int j = wkv_column<N>(g, jj);
      st[q][jj] = kTransitions ? (identity_rows && j == i - N ? 1.f : 0.f) : S[int64_t(i) * N + j];
    }
  }
  // Tokens t0.. of the block's inputs into buffer b; rows past the end are zero-filled, never read.
  auto stage = [&](int b, int64_t t0) {
    const int64_t nt = min_i64(TT, r1 - t0);
    for (int e = tid; e < kVecs * TT * N4; e += NT) {
      const int m = e / (TT * N4), tt = (e / N4) % TT, j = (e % N4) * 4;
      const float* src = m == 0 ? w : m == 1 ? k : m == 2 ? al : m == 3 ? be : r;
      const bool in = tt < nt;
      cp_async16(&sin[b][m][tt][j], src + (t0 + (in ? tt : 0)) * C + int64_t(h) * N + j, in);
    }
    for (int e = tid; e < TT * (RB / 4); e += NT) {
      const int tt = e / (RB / 4), c = (e % (RB / 4)) * 4;
      const bool in = tt < nt && !identity_rows;
      cp_async16(&sv[b][tt][c], in ? v + (t0 + tt) * C + int64_t(h) * N + i0 + c : v, in);
    }
    tensor_core::cp_async_commit();
  };
  stage(0, r0);
  int b = 0;
  for (int64_t t0 = r0; t0 < r1; t0 += TT, b ^= 1) {
    const int nt = int(min_i64(TT, r1 - t0));
    if (t0 + TT < r1) {
      stage(b ^ 1, t0 + TT);
      tensor_core::cp_async_wait<1>();
    } else {
      tensor_core::cp_async_wait<0>();
    }
    __syncthreads();  // every lane's copies into buffer b have landed
    const float(*sw)[N] = sin[b][0];
    const float(*sk)[N] = sin[b][1];
    const float(*sa)[N] = sin[b][2];
    const float(*sb)[N] = sin[b][3];
    const float(*sr)[N] = sin[b][kVecs - 1];
    for (int tt = 0; tt < nt; ++tt) {
      // sa_i = s_i · α over the row's 4 lanes (two partial sums per row for a shorter dependency chain)
      float sacc[RT][2] = {};
#pragma unroll
      for (int jj = 0; jj < J; jj += 4) {
        const float4 a4 = *reinterpret_cast<const float4*>(&sa[tt][wkv_column<N>(g, jj)]);
#pragma unroll
        for (int q = 0; q < RT; ++q) {
          sacc[q][0] = fmaf(st[q][jj], a4.x, sacc[q][0]);
          sacc[q][1] = fmaf(st[q][jj + 1], a4.y, sacc[q][1]);
          sacc[q][0] = fmaf(st[q][jj + 2], a4.z, sacc[q][0]);
          sacc[q][1] = fmaf(st[q][jj + 3], a4.w, sacc[q][1]);
        }
      }
      float sq[RT], vq[RT];
#pragma unroll
      for (int q = 0; q < RT; ++q) {
        sq[q] = sacc[q][0] + sacc[q][1];
        sq[q] += __shfl_xor_sync(0xffffffffu, sq[q], 1);
        sq[q] += __shfl_xor_sync(0xffffffffu, sq[q], 2);
        vq[q] = sv[b][tt][rg * RT + q];
      }
      float yacc[RT][2] = {};
#pragma unroll
      for (int jj = 0; jj < J; jj += 4) {
        const int j = wkv_column<N>(g, jj);
        const float4 w4 = *reinterpret_cast<const float4*>(&sw[tt][j]);
        const float4 b4 = *reinterpret_cast<const float4*>(&sb[tt][j]);
        const float4 k4 = *reinterpret_cast<const float4*>(&sk[tt][j]);
        const float wv[4] = {w4.x, w4.y, w4.z, w4.w}, bv[4] = {b4.x, b4.y, b4.z, b4.w};
        const float kv[4] = {k4.x, k4.y, k4.z, k4.w};
        float rv[4] = {};
        if (!kTransitions) {
          const float4 r4 = *reinterpret_cast<const float4*>(&sr[tt][j]);
          rv[0] = r4.x, rv[1] = r4.y, rv[2] = r4.z, rv[3] = r4.w;
        }
#pragma unroll
        for (int c = 0; c < 4; ++c)
#pragma unroll
          for (int q = 0; q < RT; ++q) {
            float& x = st[q][jj + c];
            x = x * wv[c] + sq[q] * bv[c] + vq[q] * kv[c];
            if (!kTransitions) yacc[q][c % 2] = fmaf(x, rv[c], yacc[q][c % 2]);
          }
      }
      if (!kTransitions) {
#pragma unroll
        for (int q = 0; q < RT; ++q) {
          float ya = yacc[q][0] + yacc[q][1];
          ya += __shfl_xor_sync(0xffffffffu, ya, 1);
          ya += __shfl_xor_sync(0xffffffffu, ya, 2);
          if (q % G == g) y[(t0 + tt) * C + int64_t(h) * N + i0 + rg * RT + q] = ya;
        }
      }
    }
    __syncthreads();  // buffer b is read by every lane before the next iteration stages into it
  }
#pragma unroll
  for (int q = 0; q < RT; ++q)
#pragma unroll
    for (int jj = 0; jj < J; ++jj) S[int64_t(i0 + rg * RT + q) * N + wkv_column<N>(g, jj)] = st[q][jj];
}

// Step 2 of the segment-parallel WKV-7 for N ≤ 64: rows of the state evolve independently here too
// (start_{j+1}[i] = start_j[i] · P_j + E_j[i]), so a block walks RC rows of one (sequence, head): grid
// n_seq × H × N/RC, 256 threads, thread (column c = tid % N, rows tid / N + q·256/N). Each thread keeps its
// column of P in registers and fetches the next segment's column and E values during this step's product;
// the block's RC rows of the current start state sit in shared memory, read as broadcast 16-byte vectors.
template <int N>
__global__ void __launch_bounds__(256) wkv7_chain_rows_kernel(const float* __restrict__ state, DeviceBatch bt,
                                                              const int64_t* __restrict__ seq_first_segment,
                                                              const float* __restrict__ transitions,
                                                              float* __restrict__ starts, int H) {
  constexpr int RG = 256 / N, QR = 4, RC = RG * QR, NBK = N / RC, NN = N * N;
  static_assert(N <= 64 && N % RC == 0, "wkv7_chain_rows_kernel: N must be 32 or 64");
  __shared__ __align__(16) float cur[RC][N];
  const int s = blockIdx.x / (H * NBK), h = (blockIdx.x / NBK) % H, c0 = (blockIdx.x % NBK) * RC;
  const int tid = threadIdx.x, c = tid % N, rl = tid / N;
  const int64_t g0 = seq_first_segment[s], g1 = seq_first_segment[s + 1];
  if (g1 <= g0) return;
  const float* S0 = state + (int64_t(bt.slot[s]) * H + h) * NN;
  float own[QR], p_next[N], e_next[QR];
#pragma unroll
  for (int q = 0; q < QR; ++q) own[q] = cur[rl + q * RG][c] = S0[int64_t(c0 + rl + q * RG) * N + c];
  auto fetch = [&](int64_t gi) {  // column c of P and this thread's E values for segment gi
    const float* E = transitions + (gi * H + h) * 2 * NN;
#pragma unroll
    for (int m = 0; m < N; ++m) p_next[m] = E[NN + m * N + c];
#pragma unroll
    for (int q = 0; q < QR; ++q) e_next[q] = E[(c0 + rl + q * RG) * N + c];
  };
  if (g0 < g1 - 1) fetch(g0);
  __syncthreads();
  for (int64_t gi = g0;; ++gi) {
    float* dst = starts + (gi * H + h) * NN;
#pragma unroll
    for (int q = 0; q < QR; ++q) dst[int64_t(c0 + rl + q * RG) * N + c] = own[q];
    if (gi == g1 - 1) break;
    float p[N], acc[QR][2];
#pragma unroll
    for (int m = 0; m < N; ++m) p[m] = p_next[m];
#pragma unroll
    for (int q = 0; q < QR; ++q) acc[q][0] = e_next[q], acc[q][1] = 0.f;
    if (gi + 1 < g1 - 1) fetch(gi + 1);  // in flight during the product below
#pragma unroll
    for (int m = 0; m < N; m += 4)
#pragma unroll
      for (int q = 0; q < QR; ++q) {
        const float4 x = *reinterpret_cast<const float4*>(&cur[rl + q * RG][m]);
        acc[q][0] = fmaf(x.x, p[m], acc[q][0]);
        acc[q][1] = fmaf(x.y, p[m + 1], acc[q][1]);
        acc[q][0] = fmaf(x.z, p[m + 2], acc[q][0]);
        acc[q][1] = fmaf(x.w, p[m + 3], acc[q][1]);
      }
    __syncthreads();  // every read of cur for this step is done
#pragma unroll
    for (int q = 0; q < QR; ++q) own[q] = cur[rl + q * RG][c] = acc[q][0] + acc[q][1];
    __syncthreads();
  }
}

// Step 2 of the segment-parallel WKV-7 for N = 128 (a column of P would not fit in a thread's registers,
// so the whole state walks in one block): grid n_seq × H, 256 threads as a 16 × 16 grid of (N/16)² output
// tiles; dynamic shared memory holds two N × N states and one P. Segments g0..g1-1 of sequence s: starts[g]
// gets the state segment g starts from; transitions[g] holds E then P (rows N..2N-1). The walk is
// sequential, so each step's E and P are fetched into registers during the step before (a step is then
// ≈2 µs of arithmetic instead of a chain of global-memory round trips).
template <int N>
__global__ void __launch_bounds__(256) wkv7_chain_kernel(const float* __restrict__ state, DeviceBatch bt,
                                                         const int64_t* __restrict__ seq_first_segment,
                                                         const float* __restrict__ transitions,
                                                         float* __restrict__ starts, int H) {
  constexpr int TL = N / 16, NN = N * N, PV = NN / 1024;  // PV: float4s of P per thread
  static_assert(NN % 1024 == 0, "P must split evenly into 16-byte pieces over 256 threads");
  extern __shared__ __align__(16) float chain_smem[];
  const int s = blockIdx.x / H, h = blockIdx.x % H, tid = threadIdx.x;
  const int64_t g0 = seq_first_segment[s], g1 = seq_first_segment[s + 1];
  if (g1 <= g0) return;
  float* cur = chain_smem;
  float* nxt = chain_smem + NN;
  float* Ps = chain_smem + 2 * NN;
  const int ti = (tid / 16) * TL, tj = (tid % 16) * TL;
  float e_next[TL][TL];
  float4 p_next[PV];
  auto fetch = [&](int64_t gi) {  // E and P of segment gi into registers
    const float* E = transitions + (gi * H + h) * 2 * NN;
#pragma unroll
    for (int a = 0; a < TL; ++a)
#pragma unroll
      for (int b = 0; b < TL; ++b) e_next[a][b] = E[(ti + a) * N + tj + b];
#pragma unroll
    for (int q = 0; q < PV; ++q) p_next[q] = *reinterpret_cast<const float4*>(E + NN + q * 1024 + tid * 4);
  };
  auto stage_p = [&] {
#pragma unroll
    for (int q = 0; q < PV; ++q) *reinterpret_cast<float4*>(Ps + q * 1024 + tid * 4) = p_next[q];
  };
  const float* S0 = state + (int64_t(bt.slot[s]) * H + h) * NN;
  for (int o = tid; o < NN; o += 256) cur[o] = S0[o];
  if (g0 < g1 - 1) fetch(g0), stage_p();
  __syncthreads();
  for (int64_t gi = g0;; ++gi) {
    float* dst = starts + (gi * H + h) * NN;
    for (int o = tid; o < NN; o += 256) dst[o] = cur[o];
    if (gi == g1 - 1) break;
    float acc[TL][TL];
#pragma unroll
    for (int a = 0; a < TL; ++a)
#pragma unroll
      for (int b = 0; b < TL; ++b) acc[a][b] = e_next[a][b];
    if (gi + 1 < g1 - 1) fetch(gi + 1);  // in flight during the product below
#pragma unroll 4
    for (int m = 0; m < N; ++m) {
      float pr[TL], sc[TL];
#pragma unroll
      for (int b = 0; b < TL; ++b) pr[b] = Ps[m * N + tj + b];
#pragma unroll
      for (int a = 0; a < TL; ++a) sc[a] = cur[(ti + a) * N + m];
#pragma unroll
      for (int a = 0; a < TL; ++a)
#pragma unroll
        for (int b = 0; b < TL; ++b) acc[a][b] += sc[a] * pr[b];
    }
#pragma unroll
    for (int a = 0; a < TL; ++a)
#pragma unroll
      for (int b = 0; b < TL; ++b) nxt[(ti + a) * N + tj + b] = acc[a][b];
    __syncthreads();  // every read of cur and Ps for this step is done, nxt is complete
    if (gi + 1 < g1 - 1) stage_p();
    __syncthreads();
    float* t = cur;
    cur = nxt, nxt = t;
  }
}

// After step 3: the last segment's end state of sequence s (in starts) is the sequence's new state.
template <int N>
__global__ void wkv7_store_final_kernel(float* __restrict__ state, DeviceBatch bt,
                                        const int64_t* __restrict__ seq_first_segment,
                                        const float* __restrict__ starts, int H) {
  const int s = blockIdx.x / H, h = blockIdx.x % H;
  const int64_t g0 = seq_first_segment[s], g1 = seq_first_segment[s + 1];
  if (g1 <= g0) return;
  const float* src = starts + ((g1 - 1) * H + h) * N * N;
  float* dst = state + (int64_t(bt.slot[s]) * H + h) * N * N;
  for (int o = threadIdx.x; o < N * N; o += blockDim.x) dst[o] = src[o];
}

// Any head size: thread i owns value row i, the state stays in global memory.
__global__ void wkv7_generic_kernel(const float* r, const float* w, const float* k, const float* v, const float* al,
                                    const float* be, float* state, DeviceBatch bt, int64_t C, int H, int N, float* y) {
  const int s = blockIdx.x / H, h = blockIdx.x % H, i = threadIdx.x;
  if (i >= N) return;
  float* S = state + ((int64_t(bt.slot[s]) * H + h) * N + i) * N;
  for (int64_t t = bt.row_start[s]; t < bt.row_start[s + 1]; ++t) {
    const int64_t o = t * C + int64_t(h) * N;
    float sacc = 0.f;
    for (int j = 0; j < N; ++j) sacc += S[j] * al[o + j];
    float yacc = 0.f;
    for (int j = 0; j < N; ++j) {
      S[j] = S[j] * w[o + j] + sacc * be[o + j] + v[o + i] * k[o + j];
      yacc += S[j] * r[o + j];
    }
    y[o + i] = yacc;
  }
}

// Grid (T, H), block N rounded up to a warp.
__global__ void wkv_inputs_kernel(float* w, float* a, float* k, float* alpha, float* beta, const float* w0,
                                  const float* a0, const float* k_k, const float* k_a, int64_t C, int N) {
  const int j = threadIdx.x, h = blockIdx.y;
  const bool on = j < N;
  const int64_t c = int64_t(h) * N + j, o = int64_t(blockIdx.x) * C + c;
  float kk = 0.f, av = 0.f;
  if (on) {
    const float x = w0[c] + w[o];
    w[o] = expf(-0.60653065971263342f / (1.0f + expf(-x)));  // exp(-e^{-1/2} σ(x))
    av = 1.0f / (1.0f + expf(-(a0[c] + a[o])));
    a[o] = av;
    kk = k[o] * k_k[c];
  }
  const float norm = block_sum(kk * kk);
  if (on) {
    const float kn = kk / fmaxf(sqrtf(norm), 1e-12f);
    alpha[o] = -kn;
    beta[o] = kn * av;
    k[o] = k[o] * (1.0f + (av - 1.0f) * k_a[c]);
  }
}

__global__ void value_residual_kernel(float* v, const float* vf, const float* vg, const float* v0, int64_t n, int64_t C) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float g = 1.0f / (1.0f + expf(-(v0[i % C] + vg[i])));
    v[i] += (vf[i] - v[i]) * g;
  }
}

// Grid (T, H), block N rounded up to a warp: GroupNorm of the head, bonus (Σ r k r_k) v, gate.
__global__ void output_kernel(float* y, const float* r, const float* k, const float* v, const float* r_k, const float* g,
                              const float* ln_w, const float* ln_b, float eps, int64_t C, int N) {
  const int i = threadIdx.x, h = blockIdx.y;
  const bool on = i < N;
  const int64_t c = int64_t(h) * N + i, o = int64_t(blockIdx.x) * C + c;
  const float yv = on ? y[o] : 0.f;
  const float mean = block_sum(yv) / float(N);
  const float d = on ? yv - mean : 0.f;
  const float inv = rsqrtf(block_sum(d * d) / float(N) + eps);
  const float u = block_sum(on ? r[o] * k[o] * r_k[c] : 0.f);
  if (on) y[o] = (d * inv * ln_w[c] + ln_b[c] + u * v[o]) * g[o];
}

}  // namespace

void CudaBackend::rwkv7_wkv_inputs(Tensor& w, Tensor& a, Tensor& k, Tensor& alpha, Tensor& beta, const Tensor& w0,
                                   const Tensor& a0, const Tensor& k_k, const Tensor& k_a, int head_size) {
  OpTimer timer_(this, "rwkv7_wkv_inputs");
  const int64_t C = w0.numel(), T = k.numel() / C, H = C / head_size;
  RWKVX_ASSERT(C % head_size == 0 && head_size <= 1024, "rwkv7_wkv_inputs: bad head size");
  if (T == 0) return;
  wkv_inputs_kernel<<<dim3(unsigned(T), unsigned(H)), round_up_warp(head_size), 0, stream()>>>(
      static_cast<float*>(w.data), static_cast<float*>(a.data), static_cast<float*>(k.data),
      static_cast<float*>(alpha.data), static_cast<float*>(beta.data), static_cast<const float*>(w0.data),
      static_cast<const float*>(a0.data), static_cast<const float*>(k_k.data), static_cast<const float*>(k_a.data), C,
      head_size);
  RWKVX_CUDA_LAUNCHED();
}

void CudaBackend::rwkv7_value_residual(Tensor& v, const Tensor& v_first, const Tensor& v_gate, const Tensor& v0) {
  OpTimer timer_(this, "rwkv7_value_residual");
  const int64_t n = v.numel();
  if (n == 0) return;
  value_residual_kernel<<<std::min<unsigned>(grid_for(n, 256), 65536u), 256, 0, stream()>>>(
      static_cast<float*>(v.data), static_cast<const float*>(v_first.data), static_cast<const float*>(v_gate.data),
      static_cast<const float*>(v0.data), n, v0.numel());
  RWKVX_CUDA_LAUNCHED();
}

namespace {

// wkv7_kernel's tiling, 64 threads per block either way. Sequential calls (decode, short prefills) are
// latency-bound: one row per lane, 16 rows per block, a head spread over N/16 blocks. The segment passes
// have rows to spare and are bound by arithmetic: RT rows per lane, RB rows per block.
template <int N>
struct WkvTiling {
  static constexpr int kSeqRows = 16;
  static constexpr int RT = N == 64 ? 4 : 2, RB = 16 * RT;
};
constexpr int wkv_segment_block_rows(int64_t N) {
  return N == 32 ? WkvTiling<32>::RB : N == 64 ? WkvTiling<64>::RB : WkvTiling<128>::RB;
}

// Segment length for the segment-parallel WKV-7 (0: run sequentially): about kWkvWarpsPerSm warps per
// multiprocessor in the output pass (each (segment, head) there is 2·N/RB warps), between 64 rows (shorter
// segments spend more on the chain than they save) and 1024. Swept on an H100 at the 0.2B shapes: a
// 16K-row call (the prefill window) is fastest at 384 rows (0.84 ms; 1.10 at 1024, 1.73 at 2048), a
// 128K-row call at 1024 (5.73 ms; 6.06 at 2048).
constexpr int64_t kWkvWarpsPerSm = 8;
int64_t wkv_segment_length(int option, int64_t rows, int64_t longest, int64_t H, int64_t N, int sm_count) {
  if (option >= 0) return option == 0 || longest <= option ? 0 : option;
  const int64_t rb = wkv_segment_block_rows(N);
  const int64_t target_warps = kWkvWarpsPerSm * int64_t(sm_count);
  const int64_t L = std::clamp<int64_t>((rows * H * (2 * N / rb) + target_warps - 1) / target_warps, 64, 1024);
  return longest <= L ? 0 : (L + 15) / 16 * 16;
}

// The inputs of one wkv7 call and, for the segment-parallel form, its segment batches and buffers.
struct WkvSegmentRun {
  const float *r, *w, *k, *v, *al, *be;
  float* state;
  float* y;
  int64_t C;
  int H;
  DeviceBatch seq, trans_batch, out_batch;  // sequences; segments for step 1; segments for step 3
  const int64_t* seq_first_segment;
  float* transitions;  // per (segment, head): E then P, 2N × N
  float* starts;       // per (segment, head): the state it starts from, N × N
};

// The sequential kernel over `b`'s sequences with their states in `state`.
template <int N>
void wkv7_sequential(cudaStream_t stream, const WkvSegmentRun& a, DeviceBatch b, float* state) {
  constexpr int R = WkvTiling<N>::kSeqRows;
  wkv7_kernel<N, R, 1, false><<<unsigned(b.n_seq * a.H * (N / R)), 4 * R, 0, stream>>>(
      a.r, a.w, a.k, a.v, a.al, a.be, state, b, a.C, a.H, a.y);
  RWKVX_CUDA_LAUNCHED();
}

template <int N>
void wkv7_segments(cudaStream_t stream, const WkvSegmentRun& a) {
  constexpr int RB = WkvTiling<N>::RB, RT = WkvTiling<N>::RT;
  wkv7_kernel<N, RB, RT, true><<<unsigned(a.trans_batch.n_seq * a.H * (2 * N / RB)), 4 * RB / RT, 0, stream>>>(
      a.r, a.w, a.k, a.v, a.al, a.be, a.transitions, a.trans_batch, a.C, a.H, nullptr);
  RWKVX_CUDA_LAUNCHED();
  const unsigned seq_blocks = unsigned(a.seq.n_seq * a.H);
  if constexpr (N <= 64) {
    wkv7_chain_rows_kernel<N><<<seq_blocks * unsigned(N / (4 * 256 / N)), 256, 0, stream>>>(
        a.state, a.seq, a.seq_first_segment, a.transitions, a.starts, a.H);
  } else {
    constexpr int smem = 3 * N * N * 4;  // N = 128: 192 KiB, above the default 48 KiB
    RWKVX_CUDA_CHECK(cudaFuncSetAttribute(wkv7_chain_kernel<N>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    wkv7_chain_kernel<N><<<seq_blocks, 256, smem, stream>>>(a.state, a.seq, a.seq_first_segment, a.transitions,
                                                            a.starts, a.H);
  }
  RWKVX_CUDA_LAUNCHED();
  wkv7_kernel<N, RB, RT, false><<<unsigned(a.out_batch.n_seq * a.H * (N / RB)), 4 * RB / RT, 0, stream>>>(
      a.r, a.w, a.k, a.v, a.al, a.be, a.starts, a.out_batch, a.C, a.H, a.y);
  RWKVX_CUDA_LAUNCHED();
  wkv7_store_final_kernel<N><<<seq_blocks, 256, 0, stream>>>(a.state, a.seq, a.seq_first_segment, a.starts, a.H);
  RWKVX_CUDA_LAUNCHED();
}

}  // namespace

void CudaBackend::wkv7(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& alpha,
                       const Tensor& beta, Tensor& state, const SeqBatch& batch, Tensor& y, int head_size) {
  OpTimer timer_(this, "wkv7");
  const int64_t C = r.row_size(), N = head_size, H = C / N;
  RWKVX_ASSERT(C % N == 0 && state.numel() % (H * N * N) == 0, "wkv7: state shape " + state.shape_str());
  RWKVX_ASSERT(N <= 1024, "wkv7: head size above 1024");
  if (batch.n_seq() == 0) return;
  auto f = [](const Tensor& t) { return static_cast<const float*>(t.data); };
  float* S = static_cast<float*>(state.data);
  float* out = static_cast<float*>(y.data);
  // The tiled kernels read 16-byte vectors: every row start must be 16-byte aligned.
  bool aligned = C % 4 == 0;
  for (const Tensor* t : {&r, &w, &k, &v, &alpha, &beta}) aligned = aligned && aligned16(t->data);
  if (!aligned || (N != 32 && N != 64 && N != 128)) {
    const DeviceBatch b = upload_batch(batch);
    wkv7_generic_kernel<<<unsigned(batch.n_seq() * H), round_up_warp(N), 0, stream()>>>(
        f(r), f(w), f(k), f(v), f(alpha), f(beta), S, b, C, int(H), int(N), out);
    RWKVX_CUDA_LAUNCHED();
    return;
  }
  int64_t longest = 0;
  for (size_t s = 0; s + 1 < batch.row_start.size(); ++s)
    longest = std::max(longest, batch.row_start[s + 1] - batch.row_start[s]);
  const int64_t L = wkv_segment_length(opt_.wkv_segment_rows, batch.n_rows(), longest, H, N, sm_count_);
  if (L == 0) {
    const WkvSegmentRun run{f(r), f(w), f(k), f(v), f(alpha), f(beta), S, out, C, int(H)};
    const DeviceBatch b = upload_batch(batch);
    switch (N) {
      case 32: wkv7_sequential<32>(stream(), run, b, S); break;
      case 64: wkv7_sequential<64>(stream(), run, b, S); break;
      default: wkv7_sequential<128>(stream(), run, b, S);
    }
    return;
  }
  // Segment table: row_start (n_seg + 1), transition slots (n_seg int32: -1 for each sequence's last
  // segment), output slots (n_seg int32), then each sequence's first segment (n_seq + 1).
  const int n_seq = int(batch.n_seq());
  std::vector<int64_t> row_start{batch.row_start[0]}, first{0};
  for (int s = 0; s < n_seq; ++s) {
    for (int64_t t = batch.row_start[size_t(s)]; t < batch.row_start[size_t(s) + 1]; t += L)
      row_start.push_back(std::min(t + L, batch.row_start[size_t(s) + 1]));
    first.push_back(int64_t(row_start.size()) - 1);
  }
  const int64_t n_seg = int64_t(row_start.size()) - 1;
  std::vector<int64_t> table(row_start);
  table.resize(size_t(n_seg + 1 + n_seg));  // two int32 slot arrays share n_seg words
  auto* trans_slot = reinterpret_cast<int32_t*>(table.data() + n_seg + 1);
  int32_t* out_slot = trans_slot + n_seg;
  for (int s = 0; s < n_seq; ++s)
    for (int64_t g = first[size_t(s)]; g < first[size_t(s) + 1]; ++g) {
      trans_slot[g] = g + 1 < first[size_t(s) + 1] ? int32_t(g) : -1;
      out_slot[g] = int32_t(g);
    }
  table.insert(table.end(), first.begin(), first.end());
  const int64_t* dev = upload_cached(table, wkv_segments_host_, wkv_segments_dev_);
  const DeviceBatch seq = upload_batch(batch);
  DeviceBatch trans_batch, out_batch;
  trans_batch.row_start = out_batch.row_start = dev;
  trans_batch.slot = reinterpret_cast<const int32_t*>(dev + n_seg + 1);
  out_batch.slot = trans_batch.slot + n_seg;
  trans_batch.n_seq = out_batch.n_seq = int(n_seg);
  Tensor transitions = scratch(size_t(n_seg * H * 2 * N * N) * 4), starts = scratch(size_t(n_seg * H * N * N) * 4);
  const WkvSegmentRun run{f(r), f(w), f(k), f(v), f(alpha), f(beta), S, out, C, int(H), seq, trans_batch, out_batch,
                          dev + 2 * n_seg + 1, static_cast<float*>(transitions.data), static_cast<float*>(starts.data)};
  switch (N) {
    case 32: wkv7_segments<32>(stream(), run); break;
    case 64: wkv7_segments<64>(stream(), run); break;
    default: wkv7_segments<128>(stream(), run);
  }
}

void CudaBackend::rwkv7_output(Tensor& y, const Tensor& r, const Tensor& k, const Tensor& v, const Tensor& r_k,
                               const Tensor& g, const Tensor& ln_w, const Tensor& ln_b, float eps, int head_size) {
  OpTimer timer_(this, "rwkv7_output");
  const int64_t C = ln_w.numel(), T = y.numel() / C, H = C / head_size;
  RWKVX_ASSERT(C % head_size == 0 && head_size <= 1024, "rwkv7_output: bad head size");
  if (T == 0) return;
  auto f = [](const Tensor& t) { return static_cast<const float*>(t.data); };
  output_kernel<<<dim3(unsigned(T), unsigned(H)), round_up_warp(head_size), 0, stream()>>>(
      static_cast<float*>(y.data), f(r), f(k), f(v), f(r_k), f(g), f(ln_w), f(ln_b), eps, C, head_size);
  RWKVX_CUDA_LAUNCHED();
}

}  // namespace rwkvx::cuda
