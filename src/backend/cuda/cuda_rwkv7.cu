// CUDA kernels for the RWKV-7 time-mix ops (spec model.md §3): the fused per-head elementwise steps and
// the WKV-7 recurrence.
//
// WKV-7 (sequential form): value row i of a head's state evolves on its own (sa_i reads row i only), so
// a block owns 16 value rows of one (sequence, head), 4 lanes own each row (N/4 state columns each, in
// registers) and reduce sa_i and y_i with two shuffles. The per-token vectors r, w, k, α, β are staged in
// shared memory 16 tokens at a time with 16-byte loads. The same kernel serves prefill (a block walks the
// sequence's rows) and batched decode (blocks per sequence and head). Head sizes other than 32/64/128, or
// unaligned rows, use a plain kernel with the state in global memory.
#include <cmath>

#include "backend/cuda/cuda_internal.h"

namespace rwkvx::cuda {
namespace {

template <int N, int R>
__global__ void __launch_bounds__(R * 4) wkv7_kernel(const float* __restrict__ r, const float* __restrict__ w,
                                                     const float* __restrict__ k, const float* __restrict__ v,
                                                     const float* __restrict__ al, const float* __restrict__ be,
                                                     float* __restrict__ state, DeviceBatch bt, int64_t C, int H,
                                                     float* __restrict__ y) {
  constexpr int G = 4, J = N / G, TT = 16, NB = N / R, N4 = N / 4;
  __shared__ __align__(16) float sr[TT][N], sw[TT][N], sk[TT][N], sa[TT][N], sb[TT][N];
  __shared__ float sv[TT][R];
  const int s = blockIdx.x / (H * NB), h = (blockIdx.x / NB) % H, i0 = (blockIdx.x % NB) * R;
  const int tid = threadIdx.x, il = tid / G, g = tid % G, i = i0 + il;
  const int64_t r0 = bt.row_start[s], r1 = bt.row_start[s + 1];
  if (r1 <= r0) return;
  float* S = state + (int64_t(bt.slot[s]) * H + h) * N * N + int64_t(i) * N + g * J;
  float st[J];
#pragma unroll
  for (int jj = 0; jj < J; ++jj) st[jj] = S[jj];
  for (int64_t t0 = r0; t0 < r1; t0 += TT) {
    const int nt = int(min_i64(TT, r1 - t0));
    __syncthreads();
#pragma unroll 4
    for (int e = tid; e < nt * N4; e += R * G) {  // 16-byte loads, all independent
      const int tt = e / N4, j = (e % N4) * 4;
      const int64_t o = (t0 + tt) * C + int64_t(h) * N + j;
      const float4 a4 = *reinterpret_cast<const float4*>(r + o), b4 = *reinterpret_cast<const float4*>(w + o);
      const float4 c4 = *reinterpret_cast<const float4*>(k + o), d4 = *reinterpret_cast<const float4*>(al + o);
      const float4 e4 = *reinterpret_cast<const float4*>(be + o);
      *reinterpret_cast<float4*>(&sr[tt][j]) = a4, *reinterpret_cast<float4*>(&sw[tt][j]) = b4;
      *reinterpret_cast<float4*>(&sk[tt][j]) = c4, *reinterpret_cast<float4*>(&sa[tt][j]) = d4;
      *reinterpret_cast<float4*>(&sb[tt][j]) = e4;
    }
    for (int e = tid; e < nt * R; e += R * G) sv[e / R][e % R] = v[(t0 + e / R) * C + int64_t(h) * N + i0 + e % R];
    __syncthreads();
    for (int tt = 0; tt < nt; ++tt) {
      float s0 = 0.f, s1 = 0.f;
#pragma unroll
      for (int jj = 0; jj < J; jj += 2) s0 += st[jj] * sa[tt][g * J + jj], s1 += st[jj + 1] * sa[tt][g * J + jj + 1];
      float sacc = s0 + s1;
      sacc += __shfl_xor_sync(0xffffffffu, sacc, 1);
      sacc += __shfl_xor_sync(0xffffffffu, sacc, 2);
      const float vi = sv[tt][il];
      float y0 = 0.f, y1 = 0.f;
#pragma unroll
      for (int jj = 0; jj < J; ++jj) {
        const int j = g * J + jj;
        st[jj] = st[jj] * sw[tt][j] + sacc * sb[tt][j] + vi * sk[tt][j];
        if (jj % 2) y1 += st[jj] * sr[tt][j];
        else y0 += st[jj] * sr[tt][j];
      }
      float yacc = y0 + y1;
      yacc += __shfl_xor_sync(0xffffffffu, yacc, 1);
      yacc += __shfl_xor_sync(0xffffffffu, yacc, 2);
      if (g == 0) y[(t0 + tt) * C + int64_t(h) * N + i] = yacc;
    }
  }
#pragma unroll
  for (int jj = 0; jj < J; ++jj) S[jj] = st[jj];
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

void CudaBackend::wkv7(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& alpha,
                       const Tensor& beta, Tensor& state, const SeqBatch& batch, Tensor& y, int head_size) {
  OpTimer timer_(this, "wkv7");
  const int64_t C = r.row_size(), N = head_size, H = C / N;
  RWKVX_ASSERT(C % N == 0 && state.numel() % (H * N * N) == 0, "wkv7: state shape " + state.shape_str());
  RWKVX_ASSERT(N <= 1024, "wkv7: head size above 1024");
  if (batch.n_seq() == 0) return;
  const DeviceBatch b = upload_batch(batch);
  const unsigned blocks = unsigned(batch.n_seq() * H);
  auto f = [](const Tensor& t) { return static_cast<const float*>(t.data); };
  float* S = static_cast<float*>(state.data);
  float* out = static_cast<float*>(y.data);
  // The tiled kernel reads 16-byte vectors: every row start must be 16-byte aligned.
  bool aligned = C % 4 == 0;
  for (const Tensor* t : {&r, &w, &k, &alpha, &beta}) aligned = aligned && reinterpret_cast<uintptr_t>(t->data) % 16 == 0;
  // 16 value rows (64 threads) per block: a head spreads over N/16 multiprocessors.
  switch (aligned ? N : 0) {
    case 32: wkv7_kernel<32, 16><<<blocks * 2, 64, 0, stream()>>>(f(r), f(w), f(k), f(v), f(alpha), f(beta), S, b, C, int(H), out); break;
    case 64: wkv7_kernel<64, 16><<<blocks * 4, 64, 0, stream()>>>(f(r), f(w), f(k), f(v), f(alpha), f(beta), S, b, C, int(H), out); break;
    case 128: wkv7_kernel<128, 16><<<blocks * 8, 64, 0, stream()>>>(f(r), f(w), f(k), f(v), f(alpha), f(beta), S, b, C, int(H), out); break;
    default:
      wkv7_generic_kernel<<<blocks, round_up_warp(N), 0, stream()>>>(f(r), f(w), f(k), f(v), f(alpha), f(beta), S, b, C,
                                                                     int(H), int(N), out);
  }
  RWKVX_CUDA_LAUNCHED();
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
