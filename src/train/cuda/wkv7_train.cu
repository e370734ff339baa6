// The WKV-7 recurrence for training on the GPU: wkv7_forward / wkv7_backward of train_ops_cuda.h, with
// the CPU ops of src/train/ops/wkv7.h as the reference (spec model.md §3 step 7). Per head h, state
// S ∈ ℝ^{N×N} (rows i = value index, columns j = key index), zero before token 0:
//   sa_i = Σ_j S_ij α_j;   S_ij ← S_ij w_j + sa_i β_j + v_i k_j;   y_i = Σ_j S_ij r_j
//
// Work split. Rows of S never mix in the forward (row i needs only its own sa_i), nor in the backward's
// state gradient dS (row i of dS needs only dsa_i = Σ_j dS_ij β_j). So a head's N rows are cut into CB
// blocks of R = N/CB rows (N = 64: 8 blocks of 8 rows, 96 multiprocessors for 12 heads), and each block
// keeps its rows in registers: thread = (row, lane), LPR = CB lanes per row, each lane holding J = N/LPR
// columns (interleaved in 16-byte vectors, so the lanes' shared-memory loads of a token's vectors do not
// conflict). The recurrence is latency-bound (one token after the other), so fewer columns per thread
// is faster: on an H100, 8 lanes per row beat 4 by 1.2× (forward) and 1.4× (backward). A row's dot products are lane
// partials (four accumulators, fixed order) summed by an xor butterfly: every lane gets the same bits,
// and the backward's recomputation reproduces the forward's states bit for bit.
// Only the column sums of the backward (dr, dw, dk, dα, dβ: Σ over rows i) cross blocks: the CB blocks of
// a head form a thread-block cluster; each block stores its partial column sums of a chunk of tokens
// straight into the shared memory of the block owning those columns (distributed shared memory), and
// after a cluster barrier block b adds the CB partials of columns [bR, bR+R) in rank order. No atomics:
// runs are bit-for-bit repeatable.
//
// Forward: grid (CB, H), N threads; token inputs staged 16 tokens at a time with cp.async, double
// buffered (the next group loads while this one computes), and read into registers a token ahead. α is
// staged one token ahead so that y_t and the next token's sa come from one pass over the new state (one
// butterfly latency per token). Snapshot n (the state before token n·save_every) is written as the
// forward passes it.
//
// Backward: per segment of save_every tokens, last segment first, the states are recomputed forward from
// the segment's snapshot, never inverted (S_{t-1} = (S_t - sa βᵀ - v kᵀ)/w loses digits where w is small).
// A segment is walked in sub-segments of P tokens (P = 16 for float; 8 for double N = 64, whose states
// take twice the room): the states before each of the sub-segment's tokens and after its last are kept
// in shared memory ((P+1)·R·N elements, XOR-swizzled so the row-wise writes and the column-wise reads
// are both free of bank conflicts). With save_every ≤ P (the trainer's 16) a segment is one sub-segment
// and recomputed once; a longer segment recomputes its first tokens for every later sub-segment (cost
// ~ (save_every/P)² / 2 per segment). The walk of a sub-segment has two phases, one barrier between them:
// A, "row role": each thread keeps its row i of dS (J columns) and walks the tokens back, giving dv_i and
// dsa_i (dsa to shared memory); B, "column role": thread c keeps column c of dS over the block's R rows
// (as the official RWKV-7 kernel keeps both dstate and dstateT) and walks the tokens back again with
// every dsa known, giving the partial dk_c, dβ_c, dw_c, dr_c, dα_c from the states read column-wise.
// The old values of the chunk's gradients are prefetched with its token inputs, so the ADD into them
// costs no round trip.
//
// The backward ADDs into dr, dw, dk, dv, dalpha, dbeta; all six must be given (none is optional here,
// unlike other backward ops of train_ops_cuda.h): the time-mix block always needs every one of them.
// Inputs may have any alignment (16-byte aligned ones load in 16-byte copies); the snapshot buffer must
// be 16-byte aligned (cudaMalloc memory is).
//
// Precision: float keeps the state and every dot product in float (the CPU float op sums dots in double
// and keeps dS in double; the two differ by float rounding, ~3e-7 of the largest value over 300 tokens);
// double is double throughout and matches the CPU double op to rounding (~1e-15 relative).
// Head sizes: N ∈ {8, 16, 32, 64}; another N is an rwkvx::Error.
//
// Measured on an H100 (float, H = 12, N = 64, save_every = 16; TrainCudaWkv7.DISABLED_Timing):
// T = 4096: forward 0.86 ms, backward 2.2 ms; T = 65536: forward 13.3 ms, backward 35.9 ms.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "core/error.h"
#include "train/cuda/train_ops_cuda.h"

namespace rwkvx::train::cuda {
namespace {

namespace cg = cooperative_groups;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("wkv7 (CUDA): ") + what + ": " + cudaGetErrorString(e));
}

template <class S>
__device__ __forceinline__ S fma_(S a, S b, S c) {
  if constexpr (sizeof(S) == 4) return __fmaf_rn(a, b, c);
  else return __fma_rn(a, b, c);
}

// The thread layout of one (S, N), shared by the forward and the backward (the backward's recomputation
// must split every dot product exactly as the forward did).
template <class S, int N_>
struct Cfg {
  static constexpr int N = N_;
  static constexpr int CB = N >= 64 ? 8 : N >= 32 ? 2 : 1;  // blocks (one cluster) per head
  static constexpr int LPR = CB;                             // lanes per row: R · LPR = N threads
  static constexpr int R = N / CB;                           // rows per block
  static constexpr int J = N / LPR;                          // columns per lane
  static constexpr int VEC = J < int(16 / sizeof(S)) ? J : int(16 / sizeof(S));  // columns per vector
  static constexpr int NV = J / VEC;                                              // vectors per lane
  // Lane l's columns: vector m holds columns VEC·(LPR·m + l) … + VEC-1.
  static __device__ __forceinline__ int col(int l, int m) { return VEC * (LPR * m + l); }
  // Shared-memory state layout: element (row a, column b) at a·N + (b ^ swz(a)). Row-role writes (a warp:
  // 32/LPR rows × LPR lanes at one column offset) put a's low bits on the bank bits that the lane bits
  // leave free; column-role reads (a warp: one row, 32 consecutive columns) only permute within 32.
  static constexpr bool kSwizzle = sizeof(S) == 4 && N % 32 == 0 && VEC == 4;
  static __device__ __forceinline__ int swz(int a) {
    constexpr int kLaneBits = LPR == 1 ? 0 : LPR == 2 ? 1 : LPR == 4 ? 2 : 3;
    if constexpr (kSwizzle) return ((a & 3) | ((a >> 2) << (2 + kLaneBits))) & 31;
    else return 0;
  }
  static __device__ __forceinline__ int sidx(int a, int b) { return a * N + (b ^ swz(a)); }
  static_assert(LPR == 1 || N % 32 == 0, "wkv7: lanes of a row must share full warps");
};

// ---- small device helpers -------------------------------------------------------------------------------

template <class S, int VEC>
__device__ __forceinline__ void ld_vec(const S* p, S* o) {
  if constexpr (sizeof(S) == 4 && VEC == 4) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    o[0] = x.x, o[1] = x.y, o[2] = x.z, o[3] = x.w;
  } else if constexpr (sizeof(S) == 4 && VEC == 2) {
    const float2 x = *reinterpret_cast<const float2*>(p);
    o[0] = x.x, o[1] = x.y;
  } else if constexpr (sizeof(S) == 8 && VEC == 2) {
    const double2 x = *reinterpret_cast<const double2*>(p);
    o[0] = x.x, o[1] = x.y;
  } else {
#pragma unroll
    for (int c = 0; c < VEC; ++c) o[c] = p[c];
  }
}

template <class S, int VEC>
__device__ __forceinline__ void st_vec(S* p, const S* x) {
  if constexpr (sizeof(S) == 4 && VEC == 4) *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
  else if constexpr (sizeof(S) == 4 && VEC == 2) *reinterpret_cast<float2*>(p) = make_float2(x[0], x[1]);
  else if constexpr (sizeof(S) == 8 && VEC == 2) *reinterpret_cast<double2*>(p) = make_double2(x[0], x[1]);
  else {
#pragma unroll
    for (int c = 0; c < VEC; ++c) p[c] = x[c];
  }
}

// Lane l's J columns of a length-N row.
template <class Cf, class S>
__device__ __forceinline__ void ld_cols(const S* row, int l, S (&o)[Cf::J]) {
#pragma unroll
  for (int m = 0; m < Cf::NV; ++m) ld_vec<S, Cf::VEC>(row + Cf::col(l, m), o + m * Cf::VEC);
}

template <class Cf, class S>
__device__ __forceinline__ void st_cols(S* row, int l, const S (&x)[Cf::J]) {
#pragma unroll
  for (int m = 0; m < Cf::NV; ++m) st_vec<S, Cf::VEC>(row + Cf::col(l, m), x + m * Cf::VEC);
}

// K consecutive values (a multiple of 16 bytes, 16-byte aligned) of shared memory.
template <int K, class S>
__device__ __forceinline__ void ld_vals(const S* p, S (&o)[K]) {
  constexpr int E = 16 / int(sizeof(S));
  static_assert(K % E == 0, "wkv7: whole vectors");
#pragma unroll
  for (int m = 0; m < K; m += E) ld_vec<S, E>(p + m, o + m);
}

// A lane's partial dot product: four accumulators (positions mod 4), summed pairwise.
template <int J, class S>
__device__ __forceinline__ S dot(const S (&a)[J], const S (&b)[J]) {
  static_assert(J % 4 == 0, "wkv7: J a multiple of 4");
  S a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma unroll
  for (int jj = 0; jj < J; jj += 4) {
    a0 = fma_(a[jj], b[jj], a0), a1 = fma_(a[jj + 1], b[jj + 1], a1);
    a2 = fma_(a[jj + 2], b[jj + 2], a2), a3 = fma_(a[jj + 3], b[jj + 3], a3);
  }
  return (a0 + a1) + (a2 + a3);
}

// Sum over the LPR lanes of a row (xor butterfly: every lane ends with the same bits).
template <int LPR, class S>
__device__ __forceinline__ S lane_sum(S x) {
#pragma unroll
  for (int o = LPR / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
template <int LPR, class S>
__device__ __forceinline__ void lane_sum2(S& x, S& y) {
#pragma unroll
  for (int o = LPR / 2; o > 0; o >>= 1) {
    const S a = __shfl_xor_sync(0xffffffffu, x, o), b = __shfl_xor_sync(0xffffffffu, y, o);
    x += a, y += b;
  }
}

// One token on a lane's J columns of row i: S_ij ← S_ij w_j + sa_i β_j + v_i k_j.
template <int J, class S>
__device__ __forceinline__ void step(S (&s)[J], const S (&w)[J], const S (&k)[J], const S (&b)[J], S sa, S vi) {
#pragma unroll
  for (int jj = 0; jj < J; ++jj) s[jj] = fma_(s[jj], w[jj], fma_(sa, b[jj], vi * k[jj]));
}

// cp.async: global → shared without registers (sm_80+); 16-byte copies skip L1.
template <int B>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (B == 16) asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
  else asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(s), "l"(gmem), "n"(B) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int K>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(K) : "memory");
}

// dst[r·width + e] = src[r·stride + e] for r < rows, e < width, by the whole block. a16: every source
// row starts 16-byte aligned (then width·sizeof(S) is a multiple of 16 too: N ≥ 8, R ≥ 8).
template <class S>
__device__ __forceinline__ void stage_rows(S* dst, const S* src, int rows, int width, int64_t stride, bool a16) {
  if (a16) {
    constexpr int E = 16 / int(sizeof(S));
    const int per = width / E;
    for (int idx = int(threadIdx.x); idx < rows * per; idx += int(blockDim.x)) {
      const int r = idx / per, e = (idx - r * per) * E;
      cp_async<16>(dst + r * width + e, src + r * stride + e);
    }
  } else {
    for (int idx = int(threadIdx.x); idx < rows * width; idx += int(blockDim.x)) {
      const int r = idx / width, e = idx - r * width;
      cp_async<int(sizeof(S))>(dst + r * width + e, src + r * stride + e);
    }
  }
}

// ---- forward ---------------------------------------------------------------------------------------------

constexpr int kFwdTokens = 16;  // tokens per staged group

template <class S, int N>
constexpr int fwd_stage_elems() {
  // r, w, k, β, α of the next token; v and y of the block's rows
  return 5 * kFwdTokens * N + 2 * kFwdTokens * Cfg<S, N>::R;
}

template <class S, int N>
__global__ void __launch_bounds__(N) wkv7_forward_kernel(const S* __restrict__ r, const S* __restrict__ w,
                                                         const S* __restrict__ k, const S* __restrict__ v,
                                                         const S* __restrict__ alpha, const S* __restrict__ beta,
                                                         S* __restrict__ y, S* __restrict__ snaps, int T, int H,
                                                         int L, bool a16) {
  using Cf = Cfg<S, N>;
  constexpr int G = kFwdTokens, R = Cf::R, J = Cf::J, LPR = Cf::LPR;
  constexpr int kStage = fwd_stage_elems<S, N>();
  constexpr int oR = 0, oW = G * N, oK = 2 * G * N, oB = 3 * G * N, oAn = 4 * G * N, oV = 5 * G * N;
  constexpr int oY = oV + G * R;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  S* sm = reinterpret_cast<S*>(smem_raw);

  const int b = int(blockIdx.x), h = int(blockIdx.y), tid = int(threadIdx.x), il = tid / LPR, l = tid % LPR;
  const int64_t C = int64_t(H) * N, hoff = int64_t(h) * N, roff = hoff + int64_t(b) * R;
  const int n_groups = (T + G - 1) / G;

  auto stage = [&](int g, S* buf) {
    const int t0 = g * G, n = min(G, T - t0), na = min(G, T - t0 - 1);
    stage_rows(buf + oR, r + t0 * C + hoff, n, N, C, a16);
    stage_rows(buf + oW, w + t0 * C + hoff, n, N, C, a16);
    stage_rows(buf + oK, k + t0 * C + hoff, n, N, C, a16);
    stage_rows(buf + oB, beta + t0 * C + hoff, n, N, C, a16);
    if (na > 0) stage_rows(buf + oAn, alpha + (t0 + 1) * C + hoff, na, N, C, a16);
    stage_rows(buf + oV, v + t0 * C + roff, n, R, C, a16);
    cp_commit();
  };

  S s[J];
#pragma unroll
  for (int jj = 0; jj < J; ++jj) s[jj] = 0;
  S sa = 0;  // sa of the next token (zero state before token 0)
  stage(0, sm);
  for (int g = 0; g < n_groups; ++g) {
    const S* buf = sm + (g & 1) * kStage;
    if (g + 1 < n_groups) {
      stage(g + 1, sm + ((g + 1) & 1) * kStage);
      cp_wait<1>();
    } else {
      cp_wait<0>();
    }
    __syncthreads();
    const int t0 = g * G, n = min(G, T - t0);
    auto snapshot = [&](int t) {
      st_cols<Cf>(snaps + ((int64_t(t / L) * H + h) * N + int64_t(b) * R + il) * N, l, s);
    };
    // One token's inputs in registers, loaded a token ahead of their use (the loads' latency then hides
    // behind the previous token's butterfly).
    struct In {
      S w[J], k[J], b[J], r[J], an[J], v;
    };
    auto load = [&](In& x, int u) {
      ld_cols<Cf>(buf + oW + u * N, l, x.w);
      ld_cols<Cf>(buf + oK + u * N, l, x.k);
      ld_cols<Cf>(buf + oB + u * N, l, x.b);
      ld_cols<Cf>(buf + oR + u * N, l, x.r);
      ld_cols<Cf>(buf + oAn + u * N, l, x.an);
      x.v = buf[oV + u * R + il];
    };
    auto token = [&](const In& x, int u) {
      step(s, x.w, x.k, x.b, sa, x.v);
      S yv = dot(s, x.r), nx = dot(s, x.an);
      lane_sum2<LPR>(yv, nx);
      sa = nx;
      if (l == 0) const_cast<S*>(buf)[oY + u * R + il] = yv;
    };
    if (n == G && L % G == 0) {
      // Full group, snapshots only at group starts: two register sets, alternating.
      if (t0 % L == 0) snapshot(t0);
      In x0, x1;
      load(x0, 0);
#pragma unroll 1
      for (int u = 0; u < G; u += 2) {
        load(x1, u + 1);
        token(x0, u);
        if (u + 2 < G) load(x0, u + 2);
        token(x1, u + 1);
      }
    } else {
      In x0;
      for (int u = 0; u < n; ++u) {
        if ((t0 + u) % L == 0) snapshot(t0 + u);
        load(x0, u);
        token(x0, u);
      }
    }
    __syncthreads();
    // y of the group, coalesced.
    for (int idx = tid; idx < n * R; idx += N) {
      const int u = idx / R, e = idx - u * R;
      y[(t0 + u) * C + roff + e] = buf[oY + idx];
    }
    __syncthreads();  // this buffer is refilled by the next iteration's stage
  }
}

// ---- backward --------------------------------------------------------------------------------------------

constexpr size_t kBwdSmemBudget = 200 * 1024;

// Shared memory of the backward, in elements of S, for P tokens per sub-segment.
template <class S, int N>
struct BwdLayout {
  static constexpr int R = Cfg<S, N>::R;
  static constexpr size_t elems(int P) {
    return 2 * size_t(5 * P * N + 8 * P * R)  // staged inputs + old gradients, double buffered
           + size_t(R) * N                     // snapshot
           + size_t(P + 1) * R * N             // states
           + 2 * size_t(P) * R                 // sa, dsa
           + 2 * size_t(5) * P * N;            // partial column sums, double buffered
  }
  static constexpr int P = elems(16) * sizeof(S) <= kBwdSmemBudget  ? 16
                           : elems(8) * sizeof(S) <= kBwdSmemBudget ? 8
                                                                    : 4;
  static_assert(elems(P) * sizeof(S) <= kBwdSmemBudget, "wkv7 backward: shared memory");
  // One staged buffer: w, k, α, β, r (all N columns), v, dy (the block's R rows), then the old gradients
  // (6 × R: the five column sums of columns [bR, bR+R) and dv of the block's rows).
  static constexpr int oW = 0, oK = P * N, oA = 2 * P * N, oB = 3 * P * N, oR = 4 * P * N;
  static constexpr int oV = 5 * P * N, oDY = oV + P * R, oOld = oDY + P * R;
  static constexpr int kStage = 5 * P * N + 8 * P * R;
  static constexpr int oSnap = 2 * kStage, oStates = oSnap + R * N, oSa = oStates + (P + 1) * R * N;
  static constexpr int oDsa = oSa + P * R, oPart = oDsa + P * R;
  static constexpr size_t bytes = elems(P) * sizeof(S);
};

// The six gradients; index q: the five column sums first (their partials' order), then dv.
template <class S>
struct Grads {
  S* p[6];  // dr, dw, dk, dalpha, dbeta, dv
};
constexpr int kQr = 0, kQw = 1, kQk = 2, kQa = 3, kQb = 4, kQv = 5;

template <class S, int N>
__global__ void __launch_bounds__(N) wkv7_backward_kernel(const S* __restrict__ dy, const S* __restrict__ r,
                                                          const S* __restrict__ w, const S* __restrict__ k,
                                                          const S* __restrict__ v, const S* __restrict__ alpha,
                                                          const S* __restrict__ beta, const S* __restrict__ snaps,
                                                          Grads<S> grads, int T, int H, int L, bool a16) {
  using Cf = Cfg<S, N>;
  using Ly = BwdLayout<S, N>;
  constexpr int R = Cf::R, J = Cf::J, LPR = Cf::LPR, CB = Cf::CB, P = Ly::P;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  S* sm = reinterpret_cast<S*>(smem_raw);
  S* states = sm + Ly::oStates;
  S* sa_sh = sm + Ly::oSa;
  S* dsa_sh = sm + Ly::oDsa;

  // b: the block's rank in its head's cluster (the cluster spans blockIdx.x).
  const int b = int(blockIdx.x), h = int(blockIdx.y), tid = int(threadIdx.x), il = tid / LPR, l = tid % LPR;
  const int c = tid;  // column role
  const int64_t C = int64_t(H) * N, hoff = int64_t(h) * N, roff = hoff + int64_t(b) * R;
  const int n_seg = (T + L - 1) / L;

  // Work items: sub-segment q of segment seg (from the last), recomputed chunk by chunk c = 0 … q; chunk c
  // holds tokens [seg·L + c·P, …) and the walk follows its last chunk (c == q).
  struct Item {
    int seg, q, c;
  };
  auto seg_end = [&](int sg) { return min(T, (sg + 1) * L); };
  auto n_sub = [&](int sg) { return (seg_end(sg) - sg * L + P - 1) / P; };
  auto next = [&](Item it) -> Item {
    if (it.c < it.q) return {it.seg, it.q, it.c + 1};
    if (it.q > 0) return {it.seg, it.q - 1, 0};
    if (it.seg > 0) return {it.seg - 1, n_sub(it.seg - 1) - 1, 0};
    return {-1, 0, 0};
  };
  auto stage = [&](Item it, S* buf) {
    const int ts = it.seg * L + it.c * P, n = min(P, seg_end(it.seg) - ts);
    const int64_t o = ts * C;
    stage_rows(buf + Ly::oW, w + o + hoff, n, N, C, a16);
    stage_rows(buf + Ly::oK, k + o + hoff, n, N, C, a16);
    stage_rows(buf + Ly::oA, alpha + o + hoff, n, N, C, a16);
    stage_rows(buf + Ly::oB, beta + o + hoff, n, N, C, a16);
    stage_rows(buf + Ly::oV, v + o + roff, n, R, C, a16);
    if (it.c == it.q) {
      stage_rows(buf + Ly::oR, r + o + hoff, n, N, C, a16);
      stage_rows(buf + Ly::oDY, dy + o + roff, n, R, C, a16);
#pragma unroll
      for (int q = 0; q < 6; ++q) stage_rows(buf + Ly::oOld + q * P * R, grads.p[q] + o + roff, n, R, C, a16);
    }
    if (it.c == 0)
      stage_rows(sm + Ly::oSnap, snaps + ((int64_t(it.seg) * H + h) * N + int64_t(b) * R) * N, 1, R * N, 0, a16);
    cp_commit();
  };

  S s[J], dSr[J], dSc[R];  // state row (recompute), dS row i (row role), dS column c over the block's rows
#pragma unroll
  for (int jj = 0; jj < J; ++jj) dSr[jj] = 0, s[jj] = 0;
#pragma unroll
  for (int m = 0; m < R; ++m) dSc[m] = 0;

  Item cur{n_seg - 1, n_sub(n_seg - 1) - 1, 0};
  stage(cur, sm);
  // Distributed shared memory may be written only once every block of the cluster runs.
  if constexpr (CB > 1) cg::this_cluster().sync();
  int buf = 0, walk_par = 0;
  while (cur.seg >= 0) {
    const Item nx = next(cur);
    cp_wait<0>();
    __syncthreads();
    if (cur.c == 0) {
      ld_cols<Cf>(sm + Ly::oSnap + il * N, l, s);
      __syncthreads();  // the snapshot buffer may be refilled by the stage below
    }
    if (nx.seg >= 0) stage(nx, sm + (buf ^ 1) * Ly::kStage);
    const S* sg = sm + buf * Ly::kStage;
    const int ts = cur.seg * L + cur.c * P, n = min(P, seg_end(cur.seg) - ts);
    const bool fin = cur.c == cur.q;

    // Recompute the chunk's states (row role); in the last chunk keep them (and sa) for the walk. Each
    // token's inputs are loaded into registers a token ahead.
    auto store_state = [&](int u) {
      S* st = states + u * R * N;
#pragma unroll
      for (int m = 0; m < Cf::NV; ++m)
#pragma unroll
        for (int e = 0; e < Cf::VEC; ++e) st[Cf::sidx(il, Cf::col(l, m) + e)] = s[m * Cf::VEC + e];
    };
    struct RecIn {
      S a[J], w[J], k[J], b[J], v;
    };
    auto rec_load = [&](RecIn& x, int u) {
      ld_cols<Cf>(sg + Ly::oA + u * N, l, x.a);
      ld_cols<Cf>(sg + Ly::oW + u * N, l, x.w);
      ld_cols<Cf>(sg + Ly::oK + u * N, l, x.k);
      ld_cols<Cf>(sg + Ly::oB + u * N, l, x.b);
      x.v = sg[Ly::oV + u * R + il];
    };
    auto rec_token = [&](const RecIn& x, int u) {
      const S sa = lane_sum<LPR>(dot(s, x.a));
      if (fin) {
        store_state(u);
        if (l == 0) sa_sh[u * R + il] = sa;
      }
      step(s, x.w, x.k, x.b, sa, x.v);
    };
    {
      RecIn x0, x1;
      rec_load(x0, 0);
      int u = 0;
#pragma unroll 1
      for (; u + 1 < n; u += 2) {
        rec_load(x1, u + 1);
        rec_token(x0, u);
        if (u + 2 < n) rec_load(x0, u + 2);
        rec_token(x1, u + 1);
      }
      if (u < n) rec_token(x0, u);
    }
    if (fin) {
      store_state(n);
      __syncthreads();

      // The walk, last token first; dS is the gradient w.r.t. the state after token t. Phase A, row role:
      // dS_i· += dy_i r;  dv_i = Σ_j dS_ij k_j;  dsa_i = Σ_j dS_ij β_j;  dS_i· ← dS_i· ⊙ w + dsa_i α.
      S* old = const_cast<S*>(sg) + Ly::oOld;
      {
        struct RowIn {
          S r[J], k[J], b[J], w[J], a[J], dy;
        };
        auto row_load = [&](RowIn& x, int u) {
          ld_cols<Cf>(sg + Ly::oR + u * N, l, x.r);
          ld_cols<Cf>(sg + Ly::oK + u * N, l, x.k);
          ld_cols<Cf>(sg + Ly::oB + u * N, l, x.b);
          ld_cols<Cf>(sg + Ly::oW + u * N, l, x.w);
          ld_cols<Cf>(sg + Ly::oA + u * N, l, x.a);
          x.dy = sg[Ly::oDY + u * R + il];
        };
        auto row_token = [&](const RowIn& x, int u) {
#pragma unroll
          for (int jj = 0; jj < J; ++jj) dSr[jj] = fma_(x.dy, x.r[jj], dSr[jj]);
          S dv_i = dot(dSr, x.k), dsa_i = dot(dSr, x.b);
          lane_sum2<LPR>(dv_i, dsa_i);
          if (l == 0) {
            dsa_sh[u * R + il] = dsa_i;
            old[kQv * P * R + u * R + il] += dv_i;
          }
#pragma unroll
          for (int jj = 0; jj < J; ++jj) dSr[jj] = fma_(dsa_i, x.a[jj], dSr[jj] * x.w[jj]);
        };
        RowIn x0, x1;
        row_load(x0, n - 1);
        int u = n - 1;
#pragma unroll 1
        for (; u >= 1; u -= 2) {
          row_load(x1, u - 1);
          row_token(x0, u);
          if (u >= 2) row_load(x0, u - 2);
          row_token(x1, u - 1);
        }
        if (u == 0) row_token(x0, 0);
      }
      __syncthreads();  // dsa of every row and token of the chunk

      // Phase B, column role over the block's rows m (column c = this thread): dS_mc += dy_m r_c, partial
      // dk_c, dβ_c, dw_c, dr_c, dα_c;  dS_mc ← dS_mc w_c + dsa_m α_c. The state after token t is the state
      // before token t+1, read one token earlier.
      // Partial column sums go straight to the block that owns the column (c / R), into this block's
      // slot there: [rank][q][token][column - owner·R]. Remote shared-memory stores do not wait.
      S* part = sm + Ly::oPart + walk_par * 5 * P * N;
      {
        S* dst = part;
        if constexpr (CB > 1) dst = cg::this_cluster().map_shared_rank(part, c / R);
        dst += b * 5 * P * R + c % R;
        S sc[R];
#pragma unroll
        for (int m = 0; m < R; ++m) sc[m] = states[n * R * N + Cf::sidx(m, c)];
#pragma unroll 2
        for (int u = n - 1; u >= 0; --u) {
          const S* Sp = states + u * R * N;
          const S rc = sg[Ly::oR + u * N + c], wc = sg[Ly::oW + u * N + c], ac = sg[Ly::oA + u * N + c];
          S sp[R], dym[R], vm[R], sam[R], dsm[R];
          ld_vals(sg + Ly::oDY + u * R, dym);
          ld_vals(sg + Ly::oV + u * R, vm);
          ld_vals(sa_sh + u * R, sam);
          ld_vals(dsa_sh + u * R, dsm);
#pragma unroll
          for (int m = 0; m < R; ++m) sp[m] = Sp[Cf::sidx(m, c)];
          // Two accumulators per sum (even / odd rows) for twice the independent chains.
          S dk_c[2] = {0, 0}, db_c[2] = {0, 0}, dw_c[2] = {0, 0}, dr_c[2] = {0, 0}, da_c[2] = {0, 0};
#pragma unroll
          for (int m = 0; m < R; ++m) {
            dSc[m] = fma_(dym[m], rc, dSc[m]);
            dk_c[m & 1] = fma_(dSc[m], vm[m], dk_c[m & 1]);
            db_c[m & 1] = fma_(dSc[m], sam[m], db_c[m & 1]);
            dw_c[m & 1] = fma_(dSc[m], sp[m], dw_c[m & 1]);
            dr_c[m & 1] = fma_(sc[m], dym[m], dr_c[m & 1]);
            da_c[m & 1] = fma_(dsm[m], sp[m], da_c[m & 1]);
            dSc[m] = fma_(dsm[m], ac, dSc[m] * wc);
            sc[m] = sp[m];
          }
          dst[(kQr * P + u) * R] = dr_c[0] + dr_c[1];
          dst[(kQw * P + u) * R] = dw_c[0] + dw_c[1];
          dst[(kQk * P + u) * R] = dk_c[0] + dk_c[1];
          dst[(kQa * P + u) * R] = da_c[0] + da_c[1];
          dst[(kQb * P + u) * R] = db_c[0] + db_c[1];
        }
      }

      // Every block's partials have arrived.
      if constexpr (CB > 1) cg::this_cluster().sync();
      else __syncthreads();
      // Block b sums the CB partials of its columns [bR, bR+R) in rank order and adds them to the old
      // gradients; the chunk's six gradients are stored.
      for (int pe = tid; pe < n * R; pe += N) {
        const int u = pe / R, e = pe - u * R;
        const int64_t go = (ts + u) * C + roff + e;
#pragma unroll
        for (int q = 0; q < 5; ++q) {
          S sum = 0;
#pragma unroll
          for (int rr = 0; rr < CB; ++rr) sum += part[((rr * 5 + q) * P + u) * R + e];
          grads.p[q][go] = old[q * P * R + u * R + e] + sum;
        }
        grads.p[kQv][go] = old[kQv * P * R + u * R + e];
      }
      walk_par ^= 1;
    }
    cur = nx;
    buf ^= 1;
  }
  // No block leaves while a partial could still be on its way to another.
  if constexpr (CB > 1) cg::this_cluster().sync();
}

// ---- launchers -------------------------------------------------------------------------------------------

bool aligned16(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

void check_sizes(const char* op, int64_t T, int64_t H, int64_t save_every) {
  if (save_every <= 0)
    throw Error(std::string(op) + " (CUDA): save_every must be positive, got " + std::to_string(save_every));
  if (T < 0 || H < 0 || T > INT_MAX / 2 || H > 65535)
    throw Error(std::string(op) + " (CUDA): T = " + std::to_string(T) + ", H = " + std::to_string(H) + " out of range");
}

[[noreturn]] void bad_head_size(const char* op, int64_t N) {
  throw Error(std::string(op) + " (CUDA): head size N = " + std::to_string(N) + " is not supported (8, 16, 32 or 64)");
}

template <class S, int N>
void launch_forward(cudaStream_t st, const S* r, const S* w, const S* k, const S* v, const S* alpha, const S* beta,
                    S* y, S* snaps, int T, int H, int L) {
  using Cf = Cfg<S, N>;
  const size_t smem = 2 * size_t(fwd_stage_elems<S, N>()) * sizeof(S);
  const bool a16 = aligned16({r, w, k, v, alpha, beta});
  // The snapshots are written with vector stores.
  if (!aligned16({snaps})) throw Error("wkv7_forward (CUDA): the snapshot buffer must be 16-byte aligned");
  check(cudaFuncSetAttribute(wkv7_forward_kernel<S, N>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
        "wkv7_forward: shared memory");
  wkv7_forward_kernel<S, N>
      <<<dim3(Cf::CB, unsigned(H)), N, smem, st>>>(r, w, k, v, alpha, beta, y, snaps, T, H, L, a16);
  check(cudaGetLastError(), "wkv7_forward launch");
}

template <class S, int N>
void launch_backward(cudaStream_t st, const S* dy, const S* r, const S* w, const S* k, const S* v, const S* alpha,
                     const S* beta, const S* snaps, Grads<S> g, int T, int H, int L) {
  using Cf = Cfg<S, N>;
  using Ly = BwdLayout<S, N>;
  const bool a16 = aligned16({dy, r, w, k, v, alpha, beta, snaps, g.p[0], g.p[1], g.p[2], g.p[3], g.p[4], g.p[5]});
  check(cudaFuncSetAttribute(wkv7_backward_kernel<S, N>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Ly::bytes)),
        "wkv7_backward: shared memory");
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(Cf::CB, unsigned(H));
  cfg.blockDim = dim3(N);
  cfg.dynamicSmemBytes = Ly::bytes;
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = Cf::CB;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  check(cudaLaunchKernelEx(&cfg, wkv7_backward_kernel<S, N>, dy, r, w, k, v, alpha, beta, snaps, g, T, H, L, a16),
        "wkv7_backward launch");
}

}  // namespace

template <class S>
void wkv7_forward(cudaStream_t st, const S* r, const S* w, const S* k, const S* v, const S* alpha, const S* beta, S* y,
                  S* snapshots, int64_t T, int64_t H, int64_t N, int64_t save_every) {
  check_sizes("wkv7_forward", T, H, save_every);
  if (N != 8 && N != 16 && N != 32 && N != 64) bad_head_size("wkv7_forward", N);
  if (T == 0 || H == 0) return;
  const int t = int(T), h = int(H), L = int(std::min<int64_t>(save_every, T));
  // A save_every above T has one snapshot (token 0), as with L = T.
  switch (N) {
    case 8: launch_forward<S, 8>(st, r, w, k, v, alpha, beta, y, snapshots, t, h, L); break;
    case 16: launch_forward<S, 16>(st, r, w, k, v, alpha, beta, y, snapshots, t, h, L); break;
    case 32: launch_forward<S, 32>(st, r, w, k, v, alpha, beta, y, snapshots, t, h, L); break;
    default: launch_forward<S, 64>(st, r, w, k, v, alpha, beta, y, snapshots, t, h, L); break;
  }
}

template <class S>
void wkv7_backward(cudaStream_t st, const S* dy, const S* r, const S* w, const S* k, const S* v, const S* alpha,
                   const S* beta, const S* snapshots, S* dr, S* dw, S* dk, S* dv, S* dalpha, S* dbeta, int64_t T,
                   int64_t H, int64_t N, int64_t save_every) {
  check_sizes("wkv7_backward", T, H, save_every);
  if (N != 8 && N != 16 && N != 32 && N != 64) bad_head_size("wkv7_backward", N);
  RWKVX_ASSERT(dr && dw && dk && dv && dalpha && dbeta, "wkv7_backward (CUDA): all six gradients are required");
  if (T == 0 || H == 0) return;
  const int t = int(T), h = int(H), L = int(std::min<int64_t>(save_every, T));
  const Grads<S> g{{dr, dw, dk, dalpha, dbeta, dv}};
  switch (N) {
    case 8: launch_backward<S, 8>(st, dy, r, w, k, v, alpha, beta, snapshots, g, t, h, L); break;
    case 16: launch_backward<S, 16>(st, dy, r, w, k, v, alpha, beta, snapshots, g, t, h, L); break;
    case 32: launch_backward<S, 32>(st, dy, r, w, k, v, alpha, beta, snapshots, g, t, h, L); break;
    default: launch_backward<S, 64>(st, dy, r, w, k, v, alpha, beta, snapshots, g, t, h, L); break;
  }
}

template void wkv7_forward<float>(cudaStream_t, const float*, const float*, const float*, const float*, const float*,
                                  const float*, float*, float*, int64_t, int64_t, int64_t, int64_t);
template void wkv7_forward<double>(cudaStream_t, const double*, const double*, const double*, const double*,
                                   const double*, const double*, double*, double*, int64_t, int64_t, int64_t, int64_t);
template void wkv7_backward<float>(cudaStream_t, const float*, const float*, const float*, const float*, const float*,
                                   const float*, const float*, const float*, float*, float*, float*, float*, float*,
                                   float*, int64_t, int64_t, int64_t, int64_t);
template void wkv7_backward<double>(cudaStream_t, const double*, const double*, const double*, const double*,
                                    const double*, const double*, const double*, const double*, double*, double*,
                                    double*, double*, double*, double*, int64_t, int64_t, int64_t, int64_t);

}  // namespace rwkvx::train::cuda
