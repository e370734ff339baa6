// Kernel bodies shared by every instruction set. Included once per ISA translation unit with
// RWKVX_KERNEL_ISA = 0 (scalar), 1 (AVX2 + FMA + F16C) or 2 (AVX-512 F/BW/VL/DQ), each compiled with
// matching -m flags; everything lives in a per-ISA namespace so the copies never collide.
// The vector layer below (vf, W, vload*, vfma, vhsum, vexp) is all that differs between ISAs.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "backend/cpu/kernels.h"
#include "core/dtype.h"

#if RWKVX_KERNEL_ISA > 0
#include <immintrin.h>
#endif

#if RWKVX_KERNEL_ISA == 2
#define RWKVX_ISA_NS isa_avx512
#elif RWKVX_KERNEL_ISA == 1
#define RWKVX_ISA_NS isa_avx2
#else
#define RWKVX_ISA_NS isa_scalar
#endif

namespace rwkvx::cpu::RWKVX_ISA_NS {

// ---- vector layer ------------------------------------------------------------------------------------
#if RWKVX_KERNEL_ISA == 2
using vf = __m512;
constexpr int W = 16;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vload_bf16(const uint16_t* p) {
  __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
inline vf vload_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline vf vload_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vselect_lt(vf a, vf b, vf x, vf y) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x); }
inline float vhsum(vf v) { return _mm512_reduce_add_ps(v); }
inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vpow2i(vf n) {  // 2^n for integral n in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#elif RWKVX_KERNEL_ISA == 1
using vf = __m256;
constexpr int W = 8;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vload_bf16(const uint16_t* p) {
  __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}
inline vf vload_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vf vload_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vselect_lt(vf a, vf b, vf x, vf y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
inline float vhsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vpow2i(vf n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#else
using vf = float;
constexpr int W = 1;
inline vf vzero() { return 0.f; }
inline vf vset1(float x) { return x; }
inline vf vload(const float* p) { return *p; }
inline void vstore(float* p, vf v) { *p = v; }
inline vf vload_bf16(const uint16_t* p) { return bf16_to_f32(*p); }
inline vf vload_f16(const uint16_t* p) { return f16_to_f32(*p); }
inline vf vload_i8(const int8_t* p) { return float(*p); }
inline vf vfma(vf a, vf b, vf c) { return std::fma(a, b, c); }
inline vf vadd(vf a, vf b) { return a + b; }
inline vf vsub(vf a, vf b) { return a - b; }
inline vf vmul(vf a, vf b) { return a * b; }
inline vf vdiv(vf a, vf b) { return a / b; }
inline vf vmax(vf a, vf b) { return std::max(a, b); }
inline vf vmin(vf a, vf b) { return std::min(a, b); }
inline vf vselect_lt(vf a, vf b, vf x, vf y) { return a < b ? x : y; }  // a < b ? x : y, per lane
inline float vhsum(vf v) { return v; }
inline vf vround(vf x) { return std::nearbyint(x); }
inline vf vpow2i(vf n) { return std::ldexp(1.0f, int(n)); }
#endif

// e^x with ~1 ulp error on [-87, 88] (Cephes-style: 2^n · p(r), r = x - n ln2 split in two parts).
inline vf vexp(vf x) {
  x = vmin(vmax(x, vset1(-87.3f)), vset1(88.3f));
  vf n = vround(vmul(x, vset1(1.44269504088896341f)));
  vf r = vsub(x, vmul(n, vset1(0.693359375f)));
  r = vsub(r, vmul(n, vset1(-2.12194440e-4f)));
  vf p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(vmul(p, r), r, vadd(r, vset1(1.0f)));
  // 2^n for n up to 128 would overflow the exponent field: split as 2^(n/2)·2^(n - n/2) is not needed
  // because x <= 88.3 gives n <= 127.
  return vmul(p, vpow2i(n));
}

// Weight formats as compile-time tags, so the inner loops carry no format switch.
#if RWKVX_KERNEL_ISA >= 1
// 8 values as fp32 in a 256-bit register whatever the ISA's vector width (the 8 × 8 panel transposes).
inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_bf16(const uint16_t* p) {
  const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}
inline __m256 load8_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#define RWKVX_LOAD8(fn) static __m256 load8(const T* p) { return fn(p); }
#else
#define RWKVX_LOAD8(fn)
#endif

template <WFormat F> struct Fmt;
template <> struct Fmt<WFormat::f32> {
  using T = float;
  static vf load(const T* p) { return vload(p); }
  static float one(const T* p) { return *p; }
  RWKVX_LOAD8(load8_f32)
};
template <> struct Fmt<WFormat::bf16> {
  using T = uint16_t;
  static vf load(const T* p) { return vload_bf16(p); }
  static float one(const T* p) { return bf16_to_f32(*p); }
  RWKVX_LOAD8(load8_bf16)
};
template <> struct Fmt<WFormat::f16> {
  using T = uint16_t;
  static vf load(const T* p) { return vload_f16(p); }
  static float one(const T* p) { return f16_to_f32(*p); }
  RWKVX_LOAD8(load8_f16)
};
template <> struct Fmt<WFormat::q8> {
  using T = int8_t;
  static vf load(const T* p) { return vload_i8(p); }
  static float one(const T* p) { return float(*p); }
  RWKVX_LOAD8(load8_i8)
};

template <WFormat F>
inline const typename Fmt<F>::T* row_of(const WeightView& w, int64_t r) {
  return static_cast<const typename Fmt<F>::T*>(w.data) + r * w.ld;
}
inline float row_scale(const WeightView& w, int64_t r) { return w.fmt == WFormat::q8 ? w.scales[r] : 1.0f; }

// Calls fn.template operator()<F>() with the view's format as a template argument.
template <class Fn>
inline void with_format(const WeightView& w, Fn&& fn) {
  switch (w.fmt) {
    case WFormat::f32: fn.template operator()<WFormat::f32>(); break;
    case WFormat::bf16: fn.template operator()<WFormat::bf16>(); break;
    case WFormat::f16: fn.template operator()<WFormat::f16>(); break;
    case WFormat::q8: fn.template operator()<WFormat::q8>(); break;
  }
}

// ---- GEMM: C = A · Wᵀ ----------------------------------------------------------------------------------
// Small M (decode): stream each weight row once against up to 4 activation rows. Large M (prefill):
// pack fp32 panels (converting bf16/f16/q8 once per panel) and run an MR × NR register-blocked kernel.
constexpr int kGemvMaxM = 4;
#if RWKVX_KERNEL_ISA == 2
constexpr int MR = 8;
#elif RWKVX_KERNEL_ISA == 1
constexpr int MR = 6;
#else
constexpr int MR = 1;
#endif
constexpr int NR = 2 * W;
// NC is wide so that a thread's whole column range usually fits one block and each A panel is packed once
// (B's KC × NC panel, 1 MB, lives in L3; its NR-wide micro-panels are reused from L1 across the MR loop).
constexpr int64_t KC = 256, NC = 1024, MC = 16 * MR;

// One weight row against MM activation rows; 4 independent accumulators per row hide FMA latency.
template <WFormat F, int MM>
inline void gemv_rows(const float* A, int64_t lda, const WeightView& w, int64_t n0, int64_t n1, float* C, int64_t ldc,
                      bool accumulate) {
  using L = Fmt<F>;
  const int64_t K = w.cols, Kv = K / (4 * W) * (4 * W);
  for (int64_t n = n0; n < n1; ++n) {
    const auto* row = row_of<F>(w, n);
    vf acc[MM][4];
    for (int m = 0; m < MM; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = vzero();
    for (int64_t k = 0; k < Kv; k += 4 * W) {
      const vf b0 = L::load(row + k), b1 = L::load(row + k + W), b2 = L::load(row + k + 2 * W),
               b3 = L::load(row + k + 3 * W);
      for (int m = 0; m < MM; ++m) {
        const float* a = A + m * lda + k;
        acc[m][0] = vfma(vload(a), b0, acc[m][0]);
        acc[m][1] = vfma(vload(a + W), b1, acc[m][1]);
        acc[m][2] = vfma(vload(a + 2 * W), b2, acc[m][2]);
        acc[m][3] = vfma(vload(a + 3 * W), b3, acc[m][3]);
      }
    }
    const float s = row_scale(w, n);
    for (int m = 0; m < MM; ++m) {
      float sum = vhsum(vadd(vadd(acc[m][0], acc[m][1]), vadd(acc[m][2], acc[m][3])));
      for (int64_t k = Kv; k < K; ++k) sum += A[m * lda + k] * L::one(row + k);
      float& c = C[m * ldc + n];
      c = (accumulate ? c : 0.f) + sum * s;
    }
  }
}

#if RWKVX_KERNEL_ISA > 0
// int8 weights × int8 activations (decode). Widening int8 weights to fp32 in registers costs ~4 µops per
// 8 multiply-adds and makes int8 decode compute-bound; integer dot products do 32 (AVX2) or 64
// (AVX-512BW) per 4 µops. Activation rows are quantized here, symmetric per block of kQBlock values
// (q = round(a / d), d = max|a| / 127), so the result is Σ_blocks d_block · Σ q_a q_w, times the weight
// row's scale. maddubs needs one unsigned operand: |q_a| times q_w carrying q_a's sign; both are ≤ 127
// in magnitude, so its pairwise int16 sums (≤ 2·127²) cannot saturate.
constexpr int64_t kQBlock = 64;

inline void quantize_blocks(const float* a, int64_t K, int8_t* q, uint8_t* mag, float* d) {
  for (int64_t b = 0; b < K / kQBlock; ++b) {
    const float* x = a + b * kQBlock;
    vf mx = vzero();
    for (int64_t i = 0; i < kQBlock; i += W) mx = vmax(mx, vmax(vload(x + i), vsub(vzero(), vload(x + i))));
    alignas(64) float lanes[W];
    vstore(lanes, mx);
    float amax = 0.f;
    for (int i = 0; i < W; ++i) amax = std::max(amax, lanes[i]);
    d[b] = amax / 127.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    // Round to nearest (even) in vectors; the integer conversion below is then exact.
    alignas(64) float r[kQBlock];
    for (int64_t i = 0; i < kQBlock; i += W) vstore(r + i, vround(vmul(vload(x + i), vset1(inv))));
    for (int64_t i = 0; i < kQBlock; ++i) {
      const int v = int(r[i]);
      q[b * kQBlock + i] = int8_t(v);
      mag[b * kQBlock + i] = uint8_t(v < 0 ? -v : v);
    }
  }
}

// Σ over one block of kQBlock: |q_a| · sign(q_a)·q_w, as int32 lanes.
#if RWKVX_KERNEL_ISA == 2
using vi = __m512i;
inline vi block_dot(const int8_t* w, const int8_t* q, const uint8_t* mag) {
  const __m512i wv = _mm512_loadu_si512(w), qv = _mm512_loadu_si512(q);
  const __m512i ws = _mm512_mask_sub_epi8(wv, _mm512_movepi8_mask(qv), _mm512_setzero_si512(), wv);
  const __m512i p = _mm512_maddubs_epi16(_mm512_loadu_si512(mag), ws);
  return _mm512_madd_epi16(p, _mm512_set1_epi16(1));
}
inline vf vcvt_i32(vi x) { return _mm512_cvtepi32_ps(x); }
#else
using vi = __m256i;
inline vi block_dot(const int8_t* w, const int8_t* q, const uint8_t* mag) {
  auto ld = [](const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); };
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i p0 = _mm256_maddubs_epi16(ld(mag), _mm256_sign_epi8(ld(w), ld(q)));
  const __m256i p1 = _mm256_maddubs_epi16(ld(mag + 32), _mm256_sign_epi8(ld(w + 32), ld(q + 32)));
  return _mm256_add_epi32(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones));
}
inline vf vcvt_i32(vi x) { return _mm256_cvtepi32_ps(x); }
#endif

template <int MM>
inline void gemv_q8_int(const float* A, int64_t lda, const WeightView& w, int64_t n0, int64_t n1, float* C,
                        int64_t ldc, bool accumulate) {
  const int64_t K = w.cols, nb = K / kQBlock;
  thread_local std::vector<int8_t> q;
  thread_local std::vector<uint8_t> mag;
  thread_local std::vector<float> d;
  q.resize(size_t(MM * K));
  mag.resize(size_t(MM * K));
  d.resize(size_t(MM * nb));
  for (int m = 0; m < MM; ++m)
    quantize_blocks(A + m * lda, K, q.data() + m * K, mag.data() + m * K, d.data() + m * nb);
  // Two weight rows at a time: independent accumulation chains, activation blocks loaded once per pair.
  for (int64_t n = n0; n < n1; n += 2) {
    const bool pair = n + 1 < n1;
    const int8_t* r0 = static_cast<const int8_t*>(w.data) + n * w.ld;
    const int8_t* r1 = pair ? r0 + w.ld : r0;
    vf acc[MM][2];
    for (int m = 0; m < MM; ++m) acc[m][0] = acc[m][1] = vzero();
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k = b * kQBlock;
      // Decode is bound by streaming weights: ask for the rows of the pair after next ahead of time.
      _mm_prefetch(reinterpret_cast<const char*>(r0 + 4 * w.ld + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(r0 + 5 * w.ld + k), _MM_HINT_T0);
      for (int m = 0; m < MM; ++m) {
        const int8_t* qm = q.data() + m * K + k;
        const uint8_t* am = mag.data() + m * K + k;
        const vf db = vset1(d[size_t(m * nb + b)]);
        acc[m][0] = vfma(vcvt_i32(block_dot(r0 + k, qm, am)), db, acc[m][0]);
        acc[m][1] = vfma(vcvt_i32(block_dot(r1 + k, qm, am)), db, acc[m][1]);
      }
    }
    for (int m = 0; m < MM; ++m) {
      float& c0 = C[m * ldc + n];
      c0 = (accumulate ? c0 : 0.f) + vhsum(acc[m][0]) * w.scales[n];
      if (pair) {
        float& c1 = C[m * ldc + n + 1];
        c1 = (accumulate ? c1 : 0.f) + vhsum(acc[m][1]) * w.scales[n + 1];
      }
    }
  }
}
#endif

inline void gemv_nt(const float* A, int64_t lda, int64_t M, const WeightView& w, int64_t n0, int64_t n1, float* C,
                    int64_t ldc, bool accumulate) {
#if RWKVX_KERNEL_ISA > 0
  if (w.fmt == WFormat::q8 && w.cols % kQBlock == 0) {
    switch (M) {
      case 1: gemv_q8_int<1>(A, lda, w, n0, n1, C, ldc, accumulate); break;
      case 2: gemv_q8_int<2>(A, lda, w, n0, n1, C, ldc, accumulate); break;
      case 3: gemv_q8_int<3>(A, lda, w, n0, n1, C, ldc, accumulate); break;
      default: gemv_q8_int<4>(A, lda, w, n0, n1, C, ldc, accumulate); break;
    }
    return;
  }
#endif
  with_format(w, [&]<WFormat F>() {
    switch (M) {
      case 1: gemv_rows<F, 1>(A, lda, w, n0, n1, C, ldc, accumulate); break;
      case 2: gemv_rows<F, 2>(A, lda, w, n0, n1, C, ldc, accumulate); break;
      case 3: gemv_rows<F, 3>(A, lda, w, n0, n1, C, ldc, accumulate); break;
      default: gemv_rows<F, 4>(A, lda, w, n0, n1, C, ldc, accumulate); break;
    }
  });
}

#if RWKVX_KERNEL_ISA >= 1
// Columns of an 8 × 8 block: r[j] ← (r0[j], ..., r7[j]).
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

// Packs rows [n, n + NR) × cols [k0, k0 + kc) of W into [kc][NR] fp32, scaled, zero-padded.
template <WFormat F>
inline void pack_b(const WeightView& w, int64_t n, int64_t n_end, int64_t k0, int64_t kc, float* out) {
#if RWKVX_KERNEL_ISA >= 1
  // 8 rows × 8 columns at a time: convert with vector loads, transpose in registers, store 8 panel rows.
  // (Short panels such as attention keys, K = 64, are repacked for every GEMM, so this must be cheap.)
  const int64_t kv = kc / 8 * 8;
  for (int g = 0; g < NR; g += 8) {
    const typename Fmt<F>::T* rows[8];
    float sc[8];
    for (int i = 0; i < 8; ++i) {
      const bool valid = n + g + i < n_end;
      rows[i] = valid ? row_of<F>(w, n + g + i) + k0 : nullptr;
      sc[i] = valid ? row_scale(w, n + g + i) : 0.f;
    }
    for (int64_t k = 0; k < kv; k += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = rows[i] ? _mm256_mul_ps(Fmt<F>::load8(rows[i] + k), _mm256_set1_ps(sc[i])) : _mm256_setzero_ps();
      transpose8(r);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + (k + j) * NR + g, r[j]);
    }
    for (int64_t k = kv; k < kc; ++k)
      for (int i = 0; i < 8; ++i) out[k * NR + g + i] = rows[i] ? Fmt<F>::one(rows[i] + k) * sc[i] : 0.f;
  }
#else
  for (int r = 0; r < NR; ++r) {
    const bool valid = n + r < n_end;
    const auto* row = valid ? row_of<F>(w, n + r) + k0 : nullptr;
    const float s = valid ? row_scale(w, n + r) : 0.f;
    for (int64_t k = 0; k < kc; ++k) out[k * NR + r] = valid ? Fmt<F>::one(row + k) * s : 0.f;
  }
#endif
}

// Packs rows [m, m + MR) × cols [k0, k0 + kc) of A into [kc][MR], zero-padded. Vector stores of 8 lanes
// overlap the next k's slots (which the next store overwrites); the last one is masked so nothing past the
// panel is written and neighbouring panels can be packed by other threads.
inline void pack_a(const float* A, int64_t lda, int64_t m, int64_t m_end, int64_t k0, int64_t kc, float* out) {
  const float* rows[MR];
  for (int i = 0; i < MR; ++i) rows[i] = m + i < m_end ? A + (m + i) * lda + k0 : nullptr;
  int64_t k = 0;
#if RWKVX_KERNEL_ISA >= 1
  static_assert(MR <= 8);
  const __m256i first_mr = _mm256_cmpgt_epi32(_mm256_set1_epi32(MR), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (; k + 8 <= kc; k += 8) {
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = i < MR && rows[i] ? _mm256_loadu_ps(rows[i] + k) : _mm256_setzero_ps();
    transpose8(r);
    for (int j = 0; j < 7; ++j) _mm256_storeu_ps(out + (k + j) * MR, r[j]);
    _mm256_maskstore_ps(out + (k + 7) * MR, first_mr, r[7]);
  }
#endif
  for (; k < kc; ++k)
    for (int i = 0; i < MR; ++i) out[k * MR + i] = rows[i] ? rows[i][k] : 0.f;
}

// A [M, K] packed whole, for a GEMM whose column ranges are split among threads: K block k0 (KC wide) is at
// panels + k0 · Mp (Mp = M rounded up to MR), its MR-row panel p at + p · MR · kc.
inline int64_t packed_a_size(int64_t M, int64_t K) { return (M + MR - 1) / MR * MR * K; }

inline void pack_a_panels(const float* A, int64_t lda, int64_t M, int64_t K, int64_t p0, int64_t p1, float* panels) {
  const int64_t Mp = (M + MR - 1) / MR * MR;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    for (int64_t p = p0; p < p1; ++p) pack_a(A, lda, p * MR, M, k0, kc, panels + k0 * Mp + p * MR * kc);
  }
}

// acc[MR][NR] over kc steps of packed panels, then C (+)= acc for the valid mr × nr corner.
inline void micro_kernel(int64_t kc, const float* a, const float* b, float* C, int64_t ldc, int mr, int nr, bool add) {
  vf acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = vzero();
  for (int64_t k = 0; k < kc; ++k) {
    const vf b0 = vload(b + k * NR), b1 = vload(b + k * NR + W);
    for (int i = 0; i < MR; ++i) {
      const vf ai = vset1(a[k * MR + i]);
      acc[i][0] = vfma(ai, b0, acc[i][0]);
      acc[i][1] = vfma(ai, b1, acc[i][1]);
    }
  }
  if (mr == MR && nr == NR) {
    for (int i = 0; i < MR; ++i) {
      float* c = C + i * ldc;
      vstore(c, add ? vadd(vload(c), acc[i][0]) : acc[i][0]);
      vstore(c + W, add ? vadd(vload(c + W), acc[i][1]) : acc[i][1]);
    }
    return;
  }
  alignas(64) float tmp[MR][NR];
  for (int i = 0; i < MR; ++i) vstore(tmp[i], acc[i][0]), vstore(tmp[i] + W, acc[i][1]);
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) C[i * ldc + j] = (add ? C[i * ldc + j] : 0.f) + tmp[i][j];
}

// C[m, n] (+)= Σ_k A[m, k] · B(k, n) over packed panels: pack_b(n, n_end, k0, kc, out) writes B's rows
// [k0, k0 + kc) × columns [n, n + NR) as [kc][NR] fp32, zero-padded past n_end.
// A is either packed here, MC rows at a time, or given whole by pack_a_panels (`a_panels`, A unused).
template <class PackB>
inline void gemm_packed(const float* A, int64_t lda, const float* a_panels, int64_t M, int64_t K, int64_t n0, int64_t n1,
                        float* C, int64_t ldc, bool accumulate, PackB&& pack_b) {
  thread_local std::vector<float> bpack, apack;
  bpack.resize(size_t(NC * KC));
  if (!a_panels) apack.resize(size_t(MC * KC));
  const int64_t Mp = (M + MR - 1) / MR * MR;
  for (int64_t nb = n0; nb < n1; nb += NC) {
    const int64_t nb_end = std::min(n1, nb + NC);
    for (int64_t kb = 0; kb < K; kb += KC) {
      const int64_t kc = std::min(KC, K - kb);
      const bool add = accumulate || kb > 0;
      for (int64_t n = nb; n < nb_end; n += NR) pack_b(n, nb_end, kb, kc, bpack.data() + (n - nb) * kc);
      for (int64_t mb = 0; mb < M; mb += MC) {
        const int64_t mb_end = std::min(M, mb + MC);
        const float* a = a_panels ? a_panels + kb * Mp + mb * kc : apack.data();
        if (!a_panels)
          for (int64_t m = mb; m < mb_end; m += MR) pack_a(A, lda, m, mb_end, kb, kc, apack.data() + (m - mb) * kc);
        for (int64_t n = nb; n < nb_end; n += NR) {
          const int nr = int(std::min<int64_t>(NR, nb_end - n));
          for (int64_t m = mb; m < mb_end; m += MR) {
            const int mr = int(std::min<int64_t>(MR, mb_end - m));
            micro_kernel(kc, a + (m - mb) * kc, bpack.data() + (n - nb) * kc, C + m * ldc + n, ldc, mr, nr, add);
          }
        }
      }
    }
  }
}

inline void gemm_nt(const float* A, int64_t lda, int64_t M, const WeightView& w, int64_t n0, int64_t n1, float* C,
                    int64_t ldc, bool accumulate) {
  if (M <= 0 || n1 <= n0) return;
  if (M <= kGemvMaxM || RWKVX_KERNEL_ISA == 0) {
    for (int64_t m0 = 0; m0 < M; m0 += kGemvMaxM)
      gemv_nt(A + m0 * lda, lda, std::min<int64_t>(kGemvMaxM, M - m0), w, n0, n1, C + m0 * ldc, ldc, accumulate);
    return;
  }
  with_format(w, [&]<WFormat F>() {
    gemm_packed(A, lda, nullptr, M, w.cols, n0, n1, C, ldc, accumulate,
                [&](int64_t n, int64_t n_end, int64_t k0, int64_t kc, float* out) { pack_b<F>(w, n, n_end, k0, kc, out); });
  });
}

inline void gemm_nt_packed(const float* a_panels, int64_t M, const WeightView& w, int64_t n0, int64_t n1, float* C,
                           int64_t ldc, bool accumulate) {
  if (M <= 0 || n1 <= n0) return;
  with_format(w, [&]<WFormat F>() {
    gemm_packed(nullptr, 0, a_panels, M, w.cols, n0, n1, C, ldc, accumulate,
                [&](int64_t n, int64_t n_end, int64_t k0, int64_t kc, float* out) { pack_b<F>(w, n, n_end, k0, kc, out); });
  });
}

// ---- GEMM: C = A · W (W used as stored) ----------------------------------------------------------------
// Rows of W are contiguous along n, so each k step is an axpy of a W row slice into 4 rows of C.
template <WFormat F>
inline void gemm_nn_f(const float* A, int64_t lda, int64_t M, const WeightView& w, int64_t n0, int64_t n1, float* C,
                      int64_t ldc, bool accumulate) {
  using L = Fmt<F>;
  const int64_t K = w.rows;
  constexpr int64_t TM = 4, TN = 2 * W;
  if (M == 1) {
    // One row (decode): stream W in its stored row order (prefetch-friendly; walking column blocks first
    // strides across every row and waits on memory) and accumulate into C, four rows of W per pass over C.
    if (!accumulate) std::fill(C + n0, C + n1, 0.f);
    for (int64_t k = 0; k < K; k += 4) {
      const int64_t kk = std::min<int64_t>(4, K - k);
      const typename Fmt<F>::T* rows[4];
      float a[4];
      for (int64_t q = 0; q < 4; ++q) {
        rows[q] = row_of<F>(w, k + std::min(q, kk - 1));
        a[q] = q < kk ? A[k + q] * row_scale(w, k + q) : 0.f;
      }
      int64_t n = n0;
      for (; n + W <= n1; n += W) {
        vf c = vload(C + n);
        for (int64_t q = 0; q < 4; ++q) c = vfma(vset1(a[q]), L::load(rows[q] + n), c);
        vstore(C + n, c);
      }
      for (; n < n1; ++n)
        for (int64_t q = 0; q < 4; ++q) C[n] += a[q] * L::one(rows[q] + n);
    }
    return;
  }
  for (int64_t m0 = 0; m0 < M; m0 += TM) {
    const int64_t mm = std::min(TM, M - m0);
    int64_t n = n0;
    for (; n + TN <= n1; n += TN) {
      vf acc[TM][2];
      for (int64_t i = 0; i < TM; ++i) acc[i][0] = acc[i][1] = vzero();
      for (int64_t k = 0; k < K; ++k) {
        const auto* row = row_of<F>(w, k);
        vf b0 = L::load(row + n), b1 = L::load(row + n + W);
        if constexpr (F == WFormat::q8) b0 = vmul(b0, vset1(w.scales[k])), b1 = vmul(b1, vset1(w.scales[k]));
        for (int64_t i = 0; i < mm; ++i) {
          const vf a = vset1(A[(m0 + i) * lda + k]);
          acc[i][0] = vfma(a, b0, acc[i][0]);
          acc[i][1] = vfma(a, b1, acc[i][1]);
        }
      }
      for (int64_t i = 0; i < mm; ++i) {
        float* c = C + (m0 + i) * ldc + n;
        vstore(c, accumulate ? vadd(vload(c), acc[i][0]) : acc[i][0]);
        vstore(c + W, accumulate ? vadd(vload(c + W), acc[i][1]) : acc[i][1]);
      }
    }
    for (; n < n1; ++n) {
      for (int64_t i = 0; i < mm; ++i) {
        float sum = 0.f;
        for (int64_t k = 0; k < K; ++k) sum += A[(m0 + i) * lda + k] * L::one(row_of<F>(w, k) + n) * row_scale(w, k);
        float& c = C[(m0 + i) * ldc + n];
        c = (accumulate ? c : 0.f) + sum;
      }
    }
  }
}

// Packs rows [k0, k0 + kc) × columns [n, n + NR) of W (used as stored) into [kc][NR] fp32, zero-padded.
template <WFormat F>
inline void pack_b_rows(const WeightView& w, int64_t n, int64_t n_end, int64_t k0, int64_t kc, float* out) {
  const int64_t nr = std::min<int64_t>(NR, n_end - n);
  for (int64_t k = 0; k < kc; ++k) {
    const auto* row = row_of<F>(w, k0 + k) + n;
    const vf s = vset1(row_scale(w, k0 + k));
    float* o = out + k * NR;
    if (nr == NR) {
      for (int j = 0; j < NR; j += W) vstore(o + j, vmul(Fmt<F>::load(row + j), s));
    } else {
      for (int64_t j = 0; j < NR; ++j) o[j] = j < nr ? Fmt<F>::one(row + j) * row_scale(w, k0 + k) : 0.f;
    }
  }
}

inline void gemm_nn(const float* A, int64_t lda, int64_t M, const WeightView& w, int64_t n0, int64_t n1, float* C,
                    int64_t ldc, bool accumulate) {
  if (M <= 0 || n1 <= n0) return;
  with_format(w, [&]<WFormat F>() {
    // Few rows: stream W directly. Many: the packed register-blocked kernel of gemm_nt.
    if (M <= 2 * MR || RWKVX_KERNEL_ISA == 0) return gemm_nn_f<F>(A, lda, M, w, n0, n1, C, ldc, accumulate);
    gemm_packed(A, lda, nullptr, M, w.rows, n0, n1, C, ldc, accumulate,
                [&](int64_t n, int64_t n_end, int64_t k0, int64_t kc, float* out) {
                  pack_b_rows<F>(w, n, n_end, k0, kc, out);
                });
  });
}

inline void row_to_f32(const WeightView& w, int64_t r, float* out) {
  const float s = row_scale(w, r);
  with_format(w, [&]<WFormat F>() {
    const auto* row = row_of<F>(w, r);
    for (int64_t k = 0; k < w.cols; ++k) out[k] = Fmt<F>::one(row + k) * s;
  });
}

// ---- WKV-7, blocks of value rows ---------------------------------------------------------------------
// Rows [i0, i1) of one head's WKV-7 state over T tokens. Each value row evolves on its own
// (s_i ← s_i diag(w) + (s_i·a) bᵀ + v_i kᵀ, y_i = s_i·r), so callers may split a head's rows among threads.
// Blocks of RB rows are held key-major (column j of the block contiguous): every product is then a vector
// FMA across rows with one broadcast key element, with no horizontal sums, and s·a for token t + 1 is
// accumulated while token t's update streams the block.
constexpr int64_t kWkvRowBlock = 2 * W, kWkvRowMajorMaxT = 2;

inline void wkv7_rows_generic(const float* r, const float* w, const float* k, const float* v, const float* a,
                              const float* b, int64_t stride, int64_t T, int64_t N, int64_t i0, int64_t i1, float* S,
                              float* y) {
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = t * stride;
    for (int64_t i = i0; i < i1; ++i) {
      float* Si = S + i * N;
      float sa = 0.f, yi = 0.f;
      for (int64_t j = 0; j < N; ++j) sa += Si[j] * a[o + j];
      for (int64_t j = 0; j < N; ++j) {
        Si[j] = Si[j] * w[o + j] + sa * b[o + j] + v[o + i] * k[o + j];
        yi += Si[j] * r[o + j];
      }
      y[o + i] = yi;
    }
  }
}

// Few tokens (decode): transposing a block in and out would cost more than the update, so each row is walked
// in place, with one horizontal sum for s·a and one for y per row.
inline void wkv7_rows_row_major(const float* r, const float* w, const float* k, const float* v, const float* a,
                                const float* b, int64_t stride, int64_t T, int64_t N, int64_t i0, int64_t i1, float* S,
                                float* y) {
  const int64_t nv = N / W;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = t * stride;
    for (int64_t i = i0; i < i1; ++i) {
      float* Si = S + i * N;
      vf sa = vzero();
      for (int64_t c = 0; c < nv; ++c) sa = vfma(vload(Si + c * W), vload(a + o + c * W), sa);
      const vf sab = vset1(vhsum(sa)), vi = vset1(v[o + i]);
      vf yacc = vzero();
      for (int64_t c = 0; c < nv; ++c) {
        const int64_t j = c * W;
        const vf s = vfma(vload(Si + j), vload(w + o + j), vfma(sab, vload(b + o + j), vmul(vi, vload(k + o + j))));
        vstore(Si + j, s);
        yacc = vfma(s, vload(r + o + j), yacc);
      }
      y[o + i] = vhsum(yacc);
    }
  }
}

inline void wkv7_rows(const float* r, const float* w, const float* k, const float* v, const float* a, const float* b,
                      int64_t stride, int64_t T, int64_t N, int64_t i0, int64_t i1, float* S, float* y) {
  constexpr int64_t RB = kWkvRowBlock, kMaxN = 256;
  constexpr int NV = int(RB / W);
  if (T <= kWkvRowMajorMaxT && N % W == 0) return wkv7_rows_row_major(r, w, k, v, a, b, stride, T, N, i0, i1, S, y);
  int64_t i = i0;
  for (; i + RB <= i1 && N <= kMaxN && N % 2 == 0 && T > 0; i += RB) {
    alignas(64) float st[kMaxN * RB];  // st[j · RB + ii] = S[i + ii, j]
    for (int64_t ii = 0; ii < RB; ++ii)
      for (int64_t j = 0; j < N; ++j) st[j * RB + ii] = S[(i + ii) * N + j];
    vf sa[NV];
    for (int c = 0; c < NV; ++c) sa[c] = vzero();
    for (int64_t j = 0; j < N; ++j)
      for (int c = 0; c < NV; ++c) sa[c] = vfma(vload(st + j * RB + c * W), vset1(a[j]), sa[c]);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t o = t * stride;
      // The last token has no successor: its "next a" is its own (the sums are not used).
      const float* a_next = a + (t + 1 < T ? o + stride : o);
      // Token rows are C floats apart, so nearly every token starts a new page, where hardware prefetchers
      // stop: fetch the rows two tokens ahead by hand.
      if (t + 2 < T) {
        const int64_t f = o + 2 * stride;
        for (int64_t j = 0; j < N; j += 16)
          for (const float* x : {r, w, k, a, b}) __builtin_prefetch(x + f + j);
        __builtin_prefetch(v + f + i);
      }
      // Even and odd keys sum into separate accumulators: s·a_next is the chain each token waits for.
      vf vv[NV], yv[2][NV], sa_next[2][NV];
      for (int c = 0; c < NV; ++c) {
        vv[c] = vload(v + o + i + c * W);
        yv[0][c] = yv[1][c] = sa_next[0][c] = sa_next[1][c] = vzero();
      }
      for (int64_t j = 0; j < N; j += 2) {
        for (int64_t e = 0; e < 2; ++e) {
          const int64_t jj = j + e;
          const vf wj = vset1(w[o + jj]), bj = vset1(b[o + jj]), kj = vset1(k[o + jj]);
          const vf rj = vset1(r[o + jj]), aj = vset1(a_next[jj]);
          for (int c = 0; c < NV; ++c) {
            float* p = st + jj * RB + c * W;
            const vf s = vfma(vload(p), wj, vfma(sa[c], bj, vmul(vv[c], kj)));
            vstore(p, s);
            yv[e][c] = vfma(s, rj, yv[e][c]);
            sa_next[e][c] = vfma(s, aj, sa_next[e][c]);
          }
        }
      }
      for (int c = 0; c < NV; ++c) {
        vstore(y + o + i + c * W, vadd(yv[0][c], yv[1][c]));
        sa[c] = vadd(sa_next[0][c], sa_next[1][c]);
      }
    }
    for (int64_t ii = 0; ii < RB; ++ii)
      for (int64_t j = 0; j < N; ++j) S[(i + ii) * N + j] = st[j * RB + ii];
  }
  if (i < i1) wkv7_rows_generic(r, w, k, v, a, b, stride, T, N, i, i1, S, y);
}

// ---- elementwise -------------------------------------------------------------------------------------
inline void exp_(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(x + i, vexp(vload(x + i)));
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}
inline void sigmoid_(float* x, int64_t n) {
  int64_t i = 0;
  const vf one = vset1(1.0f);
  for (; i + W <= n; i += W) vstore(x + i, vdiv(one, vadd(one, vexp(vsub(vzero(), vload(x + i))))));
  for (; i < n; ++i) x[i] = 1.0f / (1.0f + std::exp(-x[i]));
}
inline void tanh_(float* x, int64_t n) {
  // tanh(x) = 1 - 2 / (e^{2x} + 1); saturates correctly at both ends through vexp's clamp.
  int64_t i = 0;
  const vf one = vset1(1.0f), two = vset1(2.0f);
  for (; i + W <= n; i += W) {
    const vf e = vexp(vmul(two, vload(x + i)));
    vstore(x + i, vsub(one, vdiv(two, vadd(e, one))));
  }
  for (; i < n; ++i) x[i] = std::tanh(x[i]);
}
// out = (x − mean) / √(var + eps) · w + b over n values (two passes, as the reference; vector partial sums).
inline void normalize(const float* x, int64_t n, float eps, const float* w, const float* b, float* out) {
  vf s0 = vzero(), s1 = vzero();
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) s0 = vadd(s0, vload(x + i)), s1 = vadd(s1, vload(x + i + W));
  float sum = vhsum(vadd(s0, s1));
  for (; i < n; ++i) sum += x[i];
  const float mean = sum / float(n);
  const vf vm = vset1(mean);
  s0 = s1 = vzero();
  for (i = 0; i + 2 * W <= n; i += 2 * W) {
    const vf d0 = vsub(vload(x + i), vm), d1 = vsub(vload(x + i + W), vm);
    s0 = vfma(d0, d0, s0), s1 = vfma(d1, d1, s1);
  }
  float var = vhsum(vadd(s0, s1));
  for (; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.0f / std::sqrt(var / float(n) + eps);
  const vf vi = vset1(inv);
  for (i = 0; i + W <= n; i += W)
    vstore(out + i, vfma(vmul(vsub(vload(x + i), vm), vi), vload(w + i), vload(b + i)));
  for (; i < n; ++i) out[i] = (x[i] - mean) * inv * w[i] + b[i];
}
inline void relu_square_(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const vf v = vmax(vload(x + i), vzero());
    vstore(x + i, vmul(v, v));
  }
  for (; i < n; ++i) {
    const float v = x[i] > 0.f ? x[i] : 0.f;
    x[i] = v * v;
  }
}

// ---- sparse attention ---------------------------------------------------------------------------------
inline double dot_f64(const float* a, const float* b, int64_t n) {
#if RWKVX_KERNEL_ISA == 2
  __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_loadu_ps(a + i)), _mm512_cvtps_pd(_mm256_loadu_ps(b + i)), acc0);
    acc1 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_loadu_ps(a + i + 8)), _mm512_cvtps_pd(_mm256_loadu_ps(b + i + 8)), acc1);
  }
  double s = _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
#elif RWKVX_KERNEL_ISA == 1
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    acc0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(a + i)), _mm256_cvtps_pd(_mm_loadu_ps(b + i)), acc0);
    acc1 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(a + i + 4)), _mm256_cvtps_pd(_mm_loadu_ps(b + i + 4)), acc1);
  }
  alignas(32) double t[4];
  _mm256_store_pd(t, _mm256_add_pd(acc0, acc1));
  double s = (t[0] + t[1]) + (t[2] + t[3]);
#else
  int64_t i = 0;
  double s = 0;
#endif
  for (; i < n; ++i) s += double(a[i]) * b[i];
  return s;
}

// Flash-style: keys in blocks of 64; scores, block max, exp, then a rescaled running sum of v.
inline vf vload_kv(const float* p) { return vload(p); }
inline vf vload_kv(const uint16_t* p) { return vload_bf16(p); }
inline float kv_scalar(const float* p) { return *p; }
inline float kv_scalar(const uint16_t* p) { return bf16_to_f32(*p); }

// Rows [0, n) of D values, ld apart: ask for them ahead of use. Attention reads one head's slice of each
// key and value row (D values of C), rows far apart, which the hardware prefetcher does not follow; at
// long contexts they come from DRAM and the misses must overlap.
template <class KV>
inline void prefetch_rows(const KV* p, int64_t ld, int64_t n, int64_t D) {
  const int64_t row_bytes = D * int64_t(sizeof(KV));
  for (int64_t j = 0; j < n; ++j)
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(p + j * ld) + b);
}

template <class KV>
void attend_t(const float* q, const KV* k, const KV* v, int64_t ld, const int64_t* ranges, int n_ranges, int64_t D,
              float scale, float* out) {
  constexpr int64_t B = 64;
  alignas(64) float s[B];
  float m = -INFINITY, l = 0.f;
  thread_local std::vector<float> acc;
  acc.assign(size_t(D), 0.f);
  const bool vec = D % W == 0;
  for (int r = 0; r < n_ranges; ++r) {
    const int64_t r0 = ranges[2 * r], r1 = ranges[2 * r + 1];
    if (r0 < r1) prefetch_rows(k + r0 * ld, ld, std::min(B, r1 - r0), D);
    for (int64_t b0 = r0; b0 < r1; b0 += B) {
      const int64_t nb = std::min(B, ranges[2 * r + 1] - b0);
      // This block's values (used after its scores) and the next block's keys.
      prefetch_rows(v + b0 * ld, ld, nb, D);
      prefetch_rows(k + (b0 + nb) * ld, ld, std::min(B, ranges[2 * r + 1] - b0 - nb), D);
      float mb = -INFINITY;
      for (int64_t i = 0; i < nb; ++i) {
        const KV* kr = k + (b0 + i) * ld;
        float dot;
        if (vec) {
          vf a0 = vzero(), a1 = vzero();
          int64_t d = 0;
          for (; d + 2 * W <= D; d += 2 * W) {
            a0 = vfma(vload(q + d), vload_kv(kr + d), a0);
            a1 = vfma(vload(q + d + W), vload_kv(kr + d + W), a1);
          }
          if (d < D) a0 = vfma(vload(q + d), vload_kv(kr + d), a0);
          dot = vhsum(vadd(a0, a1));
        } else {
          dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += q[d] * kv_scalar(kr + d);
        }
        s[i] = dot * scale;
        mb = std::max(mb, s[i]);
      }
      const float m_new = std::max(m, mb);
      const float corr = std::exp(m - m_new);  // 0 on the first block (m = -inf)
      for (int64_t i = 0; i < nb; ++i) s[i] -= m_new;
      exp_(s, nb);
      float lb = 0.f;
      for (int64_t i = 0; i < nb; ++i) lb += s[i];
      l = l * corr + lb;
      m = m_new;
      if (vec) {
        for (int64_t d = 0; d < D; d += W) {
          vf a = vmul(vload(acc.data() + d), vset1(corr));
          for (int64_t i = 0; i < nb; ++i) a = vfma(vset1(s[i]), vload_kv(v + (b0 + i) * ld + d), a);
          vstore(acc.data() + d, a);
        }
      } else {
        for (int64_t d = 0; d < D; ++d) {
          float a = acc[size_t(d)] * corr;
          for (int64_t i = 0; i < nb; ++i) a += s[i] * kv_scalar(v + (b0 + i) * ld + d);
          acc[size_t(d)] = a;
        }
      }
    }
  }
  const float inv = 1.0f / l;
  for (int64_t d = 0; d < D; ++d) out[d] = acc[size_t(d)] * inv;
}

// Prefill attention, one block of nk keys for a group of queries held in vector lanes (see
// Kernels::attend_block). Laid out this way no operand is packed: K and V rows are read in place (one
// broadcast per element), the scores of a key are a row of s across queries, and the online softmax runs
// down the rows with the queries' running max and sum in lanes.
constexpr int kAttnLanes = W;  // mp is a multiple of one vector
// Vectors of queries per register panel for `left` remaining lanes: up to 3 with AVX-512's 32 registers
// (MR × 3 accumulators), up to 2 elsewhere; 4 left go as 2 + 2 rather than 3 + 1.
inline int panel_vectors(int64_t left) {
  const int64_t n = left / W;
  if (RWKVX_KERNEL_ISA == 2 && n >= 3 && n != 4) return 3;
  return n >= 2 ? 2 : 1;
}

// s[j0 + i][q0 ..] = scale · Σ_d k[j0 + i][d] · qT[d][q0 ..] for i < jr (rows ≥ jr repeat the last key,
// unstored); with bmax, also bmax[q0 ..] = max(bmax[q0 ..], those scores), so an unmasked block needs no
// separate pass for its maximum.
template <int NV, class KV>
inline void qk_panel(const float* qT, int64_t mp, int64_t D, const KV* const* rows, int jr, int64_t j0, int64_t q0,
                     float scale, float* s, float* bmax) {
  vf acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = vzero();
  for (int64_t d = 0; d < D; ++d) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(qT + d * mp + q0 + v * W);
    for (int i = 0; i < MR; ++i) {
      const vf a = vset1(kv_scalar(rows[i] + d));
      for (int v = 0; v < NV; ++v) acc[i][v] = vfma(a, b[v], acc[i][v]);
    }
  }
  const vf sc = vset1(scale);
  for (int i = 0; i < jr; ++i)
    for (int v = 0; v < NV; ++v) {
      acc[i][v] = vmul(acc[i][v], sc);
      vstore(s + (j0 + i) * mp + q0 + v * W, acc[i][v]);
    }
  if (bmax)
    for (int v = 0; v < NV; ++v) {
      vf mx = vload(bmax + q0 + v * W);
      for (int i = 0; i < jr; ++i) mx = vmax(mx, acc[i][v]);
      vstore(bmax + q0 + v * W, mx);
    }
}

// accT[d0 + i][q0 ..] += Σ_j v[j][d0 + i] · s[j][q0 ..] for i < dr.
template <int NV, class KV>
inline void pv_panel(const float* s, int64_t mp, const KV* v, int64_t ld, int64_t nk, int64_t d0, int dr, int64_t q0,
                     float* accT) {
  vf acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int u = 0; u < NV; ++u) acc[i][u] = vload(accT + (d0 + std::min(i, dr - 1)) * mp + q0 + u * W);
  for (int64_t j = 0; j < nk; ++j) {
    vf p[NV];
    for (int u = 0; u < NV; ++u) p[u] = vload(s + j * mp + q0 + u * W);
    const KV* vr = v + j * ld + d0;
    for (int i = 0; i < MR; ++i) {
      const vf a = vset1(kv_scalar(vr + std::min(i, dr - 1)));
      for (int u = 0; u < NV; ++u) acc[i][u] = vfma(a, p[u], acc[i][u]);
    }
  }
  for (int i = 0; i < dr; ++i)
    for (int u = 0; u < NV; ++u) vstore(accT + (d0 + i) * mp + q0 + u * W, acc[i][u]);
}

template <class KV>
void attend_block_t(const float* qT, int64_t mp, int64_t D, const KV* k, const KV* v, int64_t ld, int64_t nk,
                    const float* valid, float scale, float* s, float* m, float* l, float* accT) {
  // Rows C apart (one page each) are usually in DRAM at long contexts and defeat the hardware prefetcher:
  // ask for all of them now, so the misses overlap. Packed rows (ld = D) stream without it.
  if (ld != D) {
    prefetch_rows(k, ld, nk, D);
    prefetch_rows(v, ld, nk, D);
  }
  // Scores, MR keys × (up to) three vectors of queries per register block. Unmasked (valid == nullptr):
  // the block's maximum per query comes with them, into bmax; masked, a pass below finds it.
  thread_local std::vector<float> bmax_buf;
  bmax_buf.assign(size_t(mp), -INFINITY);
  float* bmax = bmax_buf.data();
  float* panel_max = valid ? nullptr : bmax;
  for (int64_t j0 = 0; j0 < nk; j0 += MR) {
    const int jr = int(std::min<int64_t>(MR, nk - j0));
    const KV* rows[MR];
    for (int i = 0; i < MR; ++i) rows[i] = k + (j0 + std::min(i, jr - 1)) * ld;
    for (int64_t q0 = 0; q0 < mp;) {
      const int nv = panel_vectors(mp - q0);
      if (nv == 3) qk_panel<3>(qT, mp, D, rows, jr, j0, q0, scale, s, panel_max);
      else if (nv == 2) qk_panel<2>(qT, mp, D, rows, jr, j0, q0, scale, s, panel_max);
      else qk_panel<1>(qT, mp, D, rows, jr, j0, q0, scale, s, panel_max);
      q0 += nv * W;
    }
  }
  // Online softmax per query lane over its first valid[q] keys (all nk without `valid`); the others get
  // weight 0. Row by row through s (one key's scores across the lanes are contiguous), with each lane's
  // maximum, base and sum in small arrays that stay in L1.
  if (valid) {
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t q0 = 0; q0 < mp; q0 += W) {
        const vf mx = vload(bmax + q0);
        vstore(bmax + q0, vselect_lt(vset1(float(j)), vload(valid + q0), vmax(mx, vload(s + j * mp + q0)), mx));
      }
  }
  thread_local std::vector<float> base_buf, sum_buf;
  base_buf.resize(size_t(mp));
  sum_buf.assign(size_t(mp), 0.f);
  float* base = base_buf.data();
  float* sum = sum_buf.data();
  const vf lowest = vset1(-3.4028235e38f);
  for (int64_t q0 = 0; q0 < mp; q0 += W) {
    const vf mx = vmax(vload(m + q0), vload(bmax + q0));
    vstore(bmax + q0, mx);
    vstore(base + q0, vmax(mx, lowest));  // finite even for a lane with no key yet (its weights are all 0)
  }
  for (int64_t j = 0; j < nk; ++j) {
    float* sj = s + j * mp;
    if (valid) {
      for (int64_t q0 = 0; q0 < mp; q0 += W) {
        const vf e = vselect_lt(vset1(float(j)), vload(valid + q0), vexp(vsub(vload(sj + q0), vload(base + q0))), vzero());
        vstore(sj + q0, e);
        vstore(sum + q0, vadd(vload(sum + q0), e));
      }
    } else {
      for (int64_t q0 = 0; q0 < mp; q0 += W) {
        const vf e = vexp(vsub(vload(sj + q0), vload(base + q0)));
        vstore(sj + q0, e);
        vstore(sum + q0, vadd(vload(sum + q0), e));
      }
    }
  }
  for (int64_t q0 = 0; q0 < mp; q0 += W) {
    const vf m_old = vload(m + q0), b = vload(base + q0);
    const vf corr = vexp(vsub(m_old, b));  // ~0 when m_old = -inf (then l and acc are 0 anyway)
    vstore(m + q0, vload(bmax + q0));
    vstore(l + q0, vfma(vload(l + q0), corr, vload(sum + q0)));
    for (int64_t d = 0; d < D; ++d) vstore(accT + d * mp + q0, vmul(vload(accT + d * mp + q0), corr));
  }
  // Weighted values, MR dimensions × (up to) three vectors of queries (a panel of s stays in L1 across the
  // dimension blocks).
  for (int64_t q0 = 0; q0 < mp;) {
    const int nv = panel_vectors(mp - q0);
    for (int64_t d0 = 0; d0 < D; d0 += MR) {
      const int dr = int(std::min<int64_t>(MR, D - d0));
      if (nv == 3) pv_panel<3>(s, mp, v, ld, nk, d0, dr, q0, accT);
      else if (nv == 2) pv_panel<2>(s, mp, v, ld, nk, d0, dr, q0, accT);
      else pv_panel<1>(s, mp, v, ld, nk, d0, dr, q0, accT);
    }
    q0 += nv * W;
  }
}

inline void attend_block(const float* qT, int64_t mp, int64_t D, const void* k, const void* v, WFormat kv, int64_t ld,
                         int64_t nk, const float* valid, float scale, float* s, float* m, float* l, float* accT) {
  if (kv == WFormat::bf16)
    attend_block_t(qT, mp, D, static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v), ld, nk, valid, scale, s,
                   m, l, accT);
  else
    attend_block_t(qT, mp, D, static_cast<const float*>(k), static_cast<const float*>(v), ld, nk, valid, scale, s, m, l,
                   accT);
}

inline void attend(const float* q, const void* k, const void* v, WFormat kv, int64_t ld, const int64_t* ranges,
                   int n_ranges, int64_t D, float scale, float* out) {
  if (kv == WFormat::bf16)
    attend_t(q, static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v), ld, ranges, n_ranges, D, scale, out);
  else
    attend_t(q, static_cast<const float*>(k), static_cast<const float*>(v), ld, ranges, n_ranges, D, scale, out);
}

inline float fma_peak(int64_t iters) {
  vf acc[kFmaPeakChains];
  for (int j = 0; j < kFmaPeakChains; ++j) acc[j] = vset1(float(j) * 1e-3f);
  const vf b = vset1(0.999999f), c = vset1(1e-6f);
  for (int64_t i = 0; i < iters; ++i)
    for (int j = 0; j < kFmaPeakChains; ++j) acc[j] = vfma(acc[j], b, c);
  vf s = vzero();
  for (int j = 0; j < kFmaPeakChains; ++j) s = vadd(s, acc[j]);
  return vhsum(s);
}

inline Kernels make_kernels() {
  Isa isa = RWKVX_KERNEL_ISA == 2 ? Isa::avx512 : RWKVX_KERNEL_ISA == 1 ? Isa::avx2 : Isa::scalar;
  return Kernels{isa,        gemm_nt,   gemm_nn,           packed_a_size, pack_a_panels,  gemm_nt_packed,
                 MR,         row_to_f32, wkv7_rows,        int(kWkvRowBlock), dot_f64,    attend,
                 exp_,       sigmoid_,  tanh_,             relu_square_,  normalize,      fma_peak,
                 W,          attend_block, kAttnLanes};
}

}  // namespace rwkvx::cpu::RWKVX_ISA_NS
