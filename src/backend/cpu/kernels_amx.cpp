// AMX tile GEMMs for prefill with bf16 or int8 weights (compile flags in CMakeLists.txt: AVX-512 + BF16 +
// AMX). One TDPBF16PS multiplies a 16 × 32 bf16 tile of A by a 32 × 16 tile of B into 16 × 16 fp32 sums,
// ~14× the fp32 FMA rate of a core. bf16 weights go in as they are, int8 ones as bf16 integers (exact) with
// their row scale applied to the sums. Each fp32 activation a is split into three bf16 parts, hi = bf16(a),
// mid = bf16(a − hi), lo = a − hi − mid, whose sum is a exactly (8 significant bits each), so every product
// is exact and the tiles accumulate in fp32: the result is the fp32 GEMM's up to summation order, at three
// tile products per term.
//
// Layouts. Packed A: for each part, 16 × 32 tiles stored whole (1 KB, contiguous: loads touch 16
// consecutive cache lines), row tile by row tile and K block by K block within; K is rounded up to 32
// (zeros past K) and M to 32 rows (zeros past M). Packed B (per call, thread-local): for each K block of
// 32 and each pair of 16-column tiles, the tile in the "VNNI" order TDPBF16PS reads: row i holds, for each
// of the 16 columns n, the pair W[n][k + 2i], W[n][k + 2i + 1]. C is computed in 32 × 32 blocks (four
// accumulator tiles), each over the whole K.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "backend/cpu/kernels.h"

namespace rwkvx::cpu {
namespace {

constexpr int kParts = 3;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile is 16 rows × 64 bytes: 0–3 accumulators, 4–5 A, 6–7 B. The configuration is per thread.
void configure_tiles() {
  thread_local bool configured = false;
  if (configured) return;
  TileConfig c;
  for (int i = 0; i < 8; ++i) c.rows[i] = 16, c.colsb[i] = 64;
  _tile_loadconfig(&c);
  configured = true;
}

int64_t round32(int64_t n) { return (n + 31) / 32 * 32; }
int64_t tile_a_rows(int64_t M) { return round32(M); }
int64_t tile_a_size(int64_t M, int64_t K) { return kParts * round32(M) * round32(K); }

inline __m512 bf16_to_f32(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m256i to_bf16(__m512 x) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)); }

void tile_pack_a(const float* A, int64_t lda, int64_t M, int64_t K, int64_t r0, int64_t r1, uint16_t* packed) {
  const int64_t kblocks = round32(K) / 32, part = round32(M) * round32(K);
  for (int64_t r = r0; r < r1; ++r) {
    // Row r of tile (r / 16, kb) of each part: part offset + ((r / 16) · kblocks + kb) · 512 + (r % 16) · 32.
    uint16_t* row = packed + (r / 16) * kblocks * 512 + (r % 16) * 32;
    const float* a = r < M ? A + r * lda : nullptr;
    for (int64_t k = 0; k < kblocks * 32; k += 16) {
      const int64_t left = a ? K - k : 0;
      const __mmask16 valid = left >= 16 ? __mmask16(0xffff) : left > 0 ? __mmask16((1u << left) - 1) : 0;
      const __m512 x = _mm512_maskz_loadu_ps(valid, a ? a + k : A);
      const __m256i h = to_bf16(x);
      const __m512 rest = _mm512_sub_ps(x, bf16_to_f32(h));  // exact: the bits below hi's 8
      const __m256i m = to_bf16(rest);
      const __m256i l = to_bf16(_mm512_sub_ps(rest, bf16_to_f32(m)));  // exact: ≤ 8 bits remain
      uint16_t* o = row + (k / 32) * 512 + k % 32;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), h);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + part), m);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 2 * part), l);
    }
  }
}

// r[i][j] ← r[j][i] for a 16 × 16 block of 32-bit values.
inline void transpose16(__m512i r[16]) {
  __m512i u[16];
  for (int g = 0; g < 16; g += 4) {
    const __m512i a = _mm512_unpacklo_epi32(r[g], r[g + 1]), b = _mm512_unpackhi_epi32(r[g], r[g + 1]);
    const __m512i c = _mm512_unpacklo_epi32(r[g + 2], r[g + 3]), d = _mm512_unpackhi_epi32(r[g + 2], r[g + 3]);
    u[g] = _mm512_unpacklo_epi64(a, c);  // in each 128-bit lane L: element 4L of rows g..g+3
    u[g + 1] = _mm512_unpackhi_epi64(a, c);
    u[g + 2] = _mm512_unpacklo_epi64(b, d);
    u[g + 3] = _mm512_unpackhi_epi64(b, d);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x88), v1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xdd);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x88),
                  w1 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xdd);
    r[e] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[8 + e] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
    r[4 + e] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
  }
}

// 32 int8 weights as bf16 (exact: integers up to 256 fit bf16's 8-bit significand); masked-off lanes are 0.
inline __m512i q8_as_bf16(const int8_t* q, __mmask32 valid) {
  const __m256i raw = _mm256_maskz_loadu_epi8(valid, q);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

// Columns [n0, n1) of bf16 (or int8) W as B tiles: tile (kb, pair, t) at ((kb · pairs + pair) · 2 + t) · 512 values.
// Transposed (gemm_nt): W [N, K], rows of W are output columns; each tile is a 16 × 16 transpose of
// 32-bit pairs. As stored (gemm_nn): W [K, N]; tile row i interleaves rows k + 2i and k + 2i + 1.
void pack_b(const WeightView& w, bool transposed, int64_t n0, int64_t n1, int64_t pairs, uint16_t* out) {
  const int64_t K = transposed ? w.cols : w.rows, kblocks = round32(K) / 32;
  const auto* W = static_cast<const uint16_t*>(w.data);
  // vpermw indices that interleave two 16-value rows held in one register's halves.
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                           8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  for (int64_t p = 0; p < pairs; ++p) {
    for (int t = 0; t < 2; ++t) {
      const int64_t nb = n0 + 32 * p + 16 * t, ncols = std::clamp<int64_t>(n1 - nb, 0, 16);
      for (int64_t kb = 0; kb < kblocks; ++kb) {
        const int64_t k = kb * 32, left = K - k;
        uint16_t* o = out + ((kb * pairs + p) * 2 + t) * 512;
        if (transposed) {
          const __mmask32 valid = left >= 32 ? ~__mmask32(0) : __mmask32((1u << left) - 1);
          __m512i r[16];
          for (int j = 0; j < 16; ++j)
            r[j] = j >= ncols                ? _mm512_setzero_si512()
                   : w.fmt == WFormat::q8 ? q8_as_bf16(static_cast<const int8_t*>(w.data) + (nb + j) * w.ld + k, valid)
                                          : _mm512_maskz_loadu_epi16(valid, W + (nb + j) * w.ld + k);
          transpose16(r);
          for (int i = 0; i < 16; ++i) _mm512_storeu_si512(o + i * 32, r[i]);
        } else {
          const __mmask16 cols = __mmask16((1u << ncols) - 1);
          for (int i = 0; i < 16; ++i) {
            const int64_t k0 = k + 2 * i;
            const __m256i lo = k0 < K ? _mm256_maskz_loadu_epi16(cols, W + k0 * w.ld + nb) : _mm256_setzero_si256();
            const __m256i hi = k0 + 1 < K ? _mm256_maskz_loadu_epi16(cols, W + (k0 + 1) * w.ld + nb) : _mm256_setzero_si256();
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            _mm512_storeu_si512(o + i * 32, _mm512_permutexvar_epi16(interleave, both));
          }
        }
      }
    }
  }
}

// A 16 × 16 block of C (rows × cols of it valid, either may be ≤ 0) in and out of an accumulator tile:
// whole blocks go straight to C, edge blocks through a zero-padded copy. (The tile intrinsics take their
// register number as a literal, hence the macros.)
inline const float* c_source(const float* C, int64_t ldc, int64_t m, int64_t n, int64_t rows, int64_t cols,
                             float* edge, int64_t* stride) {
  if (rows >= 16 && cols >= 16) return *stride = ldc * 4, C + m * ldc + n;
  std::memset(edge, 0, 16 * 16 * 4);
  for (int64_t i = 0; i < std::min<int64_t>(rows, 16); ++i)
    if (cols > 0) std::memcpy(edge + i * 16, C + (m + i) * ldc + n, size_t(std::min<int64_t>(cols, 16)) * 4);
  return *stride = 64, edge;
}
inline void c_edge_out(float* C, int64_t ldc, int64_t m, int64_t n, int64_t rows, int64_t cols, const float* edge) {
  for (int64_t i = 0; i < std::min<int64_t>(rows, 16); ++i)
    std::memcpy(C + (m + i) * ldc + n, edge + i * 16, size_t(std::min<int64_t>(cols, 16)) * 4);
}
// int8 weights: the tile sums Σ a · q; C (+)= scale[n] · sum, applied on the way out.
inline void c_scaled_out(float* C, int64_t ldc, int64_t m, int64_t n, int64_t rows, int64_t cols, const float* edge,
                         const float* scales, bool accumulate) {
  const __mmask16 valid = __mmask16((1u << std::min<int64_t>(cols, 16)) - 1);
  const __m512 s = _mm512_maskz_loadu_ps(valid, scales + n);
  for (int64_t i = 0; i < std::min<int64_t>(rows, 16); ++i) {
    float* c = C + (m + i) * ldc + n;
    const __m512 base = accumulate ? _mm512_maskz_loadu_ps(valid, c) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(c, valid, _mm512_fmadd_ps(_mm512_load_ps(edge + i * 16), s, base));
  }
}
#define RWKVX_C_IN(T, m, n, rows, cols)                                             \
  do {                                                                              \
    if (!accumulate || scales) {                                                    \
      _tile_zero(T);                                                                \
    } else {                                                                        \
      int64_t st;                                                                   \
      const float* src = c_source(C, ldc, m, n, rows, cols, edge[T], &st);          \
      _tile_loadd(T, src, st);                                                      \
    }                                                                               \
  } while (0)
#define RWKVX_C_OUT(T, m, n, rows, cols)                                            \
  do {                                                                              \
    if (scales) {                                                                   \
      if ((rows) > 0 && (cols) > 0) {                                               \
        _tile_stored(T, edge[T], 64);                                               \
        c_scaled_out(C, ldc, m, n, rows, cols, edge[T], scales, accumulate);        \
      }                                                                             \
    } else if ((rows) >= 16 && (cols) >= 16) {                                      \
      _tile_stored(T, C + (m) * ldc + (n), ldc * 4);                                \
    } else if ((rows) > 0 && (cols) > 0) {                                          \
      _tile_stored(T, edge[T], 64);                                                 \
      c_edge_out(C, ldc, m, n, rows, cols, edge[T]);                                \
    }                                                                               \
  } while (0)

void tile_gemm(const uint16_t* packed, int64_t M, const WeightView& w, bool transposed, int64_t n0, int64_t n1,
               float* C, int64_t ldc, bool accumulate) {
  const int64_t Mp = round32(M), Kp = round32(transposed ? w.cols : w.rows), part = Mp * Kp, kblocks = Kp / 32;
  const int64_t pairs = (n1 - n0 + 31) / 32;
  thread_local std::vector<uint16_t> b;
  b.resize(size_t(pairs * 32 * Kp));
  pack_b(w, transposed, n0, n1, pairs, b.data());
  configure_tiles();
  alignas(64) float edge[4][16 * 16];
  const float* scales = w.fmt == WFormat::q8 ? w.scales : nullptr;
  // Each 32 × 32 block of C takes the whole K in one pass (C is written once: passes over K blocks
  // cost more in C traffic than they saved); a row pair's A tiles are reused from L2 by every column pair.
  for (int64_t m = 0; m < Mp; m += 32) {
    const int64_t rows = M - m;
    const uint16_t* a0 = packed + (m / 16) * kblocks * 512;  // tile (m / 16, kb) of part 0 at a0 + kb · 512
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t n = n0 + 32 * p, cols = n1 - n;
      RWKVX_C_IN(0, m, n, rows, cols);
      RWKVX_C_IN(1, m, n + 16, rows, cols - 16);
      RWKVX_C_IN(2, m + 16, n, rows - 16, cols);
      RWKVX_C_IN(3, m + 16, n + 16, rows - 16, cols - 16);
      for (int64_t kb = 0; kb < kblocks; ++kb) {
        const uint16_t* bt = b.data() + (kb * pairs + p) * 1024;
        // B tiles come from L2: ask for the next step's 2 KB now (the hardware prefetcher does not).
        const uint16_t* next = kb + 1 < kblocks ? bt + pairs * 1024 : b.data() + (p + 1 < pairs ? p + 1 : 0) * 1024;
        for (int i = 0; i < 32; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + i * 32), _MM_HINT_T0);
        _tile_loadd(6, bt, 64);
        _tile_loadd(7, bt + 512, 64);
        const uint16_t* a = a0 + kb * 512;
        for (int q = 0; q < kParts; ++q, a += part) {
          _tile_loadd(4, a, 64);
          _tile_loadd(5, a + kblocks * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      RWKVX_C_OUT(0, m, n, rows, cols);
      RWKVX_C_OUT(1, m, n + 16, rows, cols - 16);
      RWKVX_C_OUT(2, m + 16, n, rows - 16, cols);
      RWKVX_C_OUT(3, m + 16, n + 16, rows - 16, cols - 16);
    }
  }
}

void tile_gemm_nt(const uint16_t* packed, int64_t M, const WeightView& w, int64_t n0, int64_t n1, float* C,
                  int64_t ldc, bool accumulate) {
  tile_gemm(packed, M, w, true, n0, n1, C, ldc, accumulate);
}

void tile_gemm_nn(const uint16_t* packed, int64_t M, const WeightView& w, int64_t n0, int64_t n1, float* C,
                  int64_t ldc, bool accumulate) {
  tile_gemm(packed, M, w, false, n0, n1, C, ldc, accumulate);
}

float tile_peak(int64_t iters) {
  configure_tiles();
  alignas(64) uint16_t ones[16 * 32];
  std::fill(ones, ones + 16 * 32, uint16_t(0x3f80));
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float out[16 * 16];
  _tile_stored(0, out, 64);
  return out[0];
}

}  // namespace

const Kernels& amx_kernels() {
  static const Kernels k = [] {
    Kernels t = avx512_kernels();
    t.isa = Isa::amx;
    t.tile_a_rows = tile_a_rows;
    t.tile_a_size = tile_a_size;
    t.tile_pack_a = tile_pack_a;
    t.tile_gemm_nt = tile_gemm_nt;
    t.tile_gemm_nn = tile_gemm_nn;
    t.tile_peak = tile_peak;
    return t;
  }();
  return k;
}

}  // namespace rwkvx::cpu
