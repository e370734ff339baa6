// The CPU backend's kernels, one table per instruction set (kernels_scalar.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp all compile kernels_impl.h with their own flags; kernels_amx.cpp adds AMX tile GEMMs
// to the AVX-512 table). cpu_backend.cpp picks the table once (core/cpu_features.h) and splits work
// across threads; kernels themselves are single-threaded.
#pragma once
#include <cstdint>

#include "core/cpu_features.h"

namespace rwkvx::cpu {

enum class WFormat : uint8_t { f32, f16, bf16, q8 };

// A weight matrix [rows, cols] as stored: row r starts at data + r * ld elements. q8: int8 values with
// one fp32 scale per row (value = scale[r] * q).
struct WeightView {
  WFormat fmt = WFormat::f32;
  const void* data = nullptr;
  const float* scales = nullptr;
  int64_t rows = 0, cols = 0, ld = 0;
};

struct Kernels {
  Isa isa;
  // C[m, n] = Σ_k A[m, k] · W[n, k] for m < M, n in [n0, n1). A row stride lda, C row stride ldc.
  // `accumulate` adds to C instead of overwriting it.
  void (*gemm_nt)(const float* A, int64_t lda, int64_t M, const WeightView& W, int64_t n0, int64_t n1, float* C,
                  int64_t ldc, bool accumulate);
  // C[m, n] = Σ_k A[m, k] · W[k, n] for n in [n0, n1) (W used as stored, e.g. low-rank matrices, V rows).
  void (*gemm_nn)(const float* A, int64_t lda, int64_t M, const WeightView& W, int64_t n0, int64_t n1, float* C,
                  int64_t ldc, bool accumulate);
  // gemm_nt with A packed once and shared: pack_a_panels writes A's row panels [p0, p1) (each
  // `a_panel_rows` rows; threads may pack disjoint ranges at once) into packed_a_size(M, K) floats, then
  // gemm_nt_packed computes columns [n0, n1) of C from them as gemm_nt would.
  int64_t (*packed_a_size)(int64_t M, int64_t K);
  void (*pack_a_panels)(const float* A, int64_t lda, int64_t M, int64_t K, int64_t p0, int64_t p1, float* panels);
  void (*gemm_nt_packed)(const float* panels, int64_t M, const WeightView& W, int64_t n0, int64_t n1, float* C,
                         int64_t ldc, bool accumulate);
  int a_panel_rows;
  // Row of W converted to fp32 (embedding lookup).
  void (*row_to_f32)(const WeightView& W, int64_t row, float* out);
  // Value rows [i0, i1) of one head of the WKV-7 recurrence over T tokens (spec model.md §3 step 7): rows
  // evolve independently, so a head may be split among threads. Vectors for token t are at r + t*stride etc.;
  // S [N, N] row-major (i = value, j = key), rows [i0, i1) updated in place; y + t*stride + i receives them.
  void (*wkv7_rows)(const float* r, const float* w, const float* k, const float* v, const float* a,
                    const float* b, int64_t stride, int64_t T, int64_t N, int64_t i0, int64_t i1, float* S, float* y);
  int wkv_row_block;  // wkv7_rows runs its fast path on blocks of this many rows
  // Σ a[i]·b[i] accumulated in fp64 (the sparse-attention gate: top-k selection is discontinuous, so its
  // scores must not depend on summation order; spec model.md §5.6).
  double (*dot_f64)(const float* a, const float* b, int64_t n);
  // One query head attending over key slot ranges [ranges[2i], ranges[2i+1]), i < n_ranges: softmax of
  // scale·q·k over all those slots, then the weighted sum of v. Key/value slot s starts at element s·ld of
  // k and v, which hold `kv` values (f32 or bf16).
  void (*attend)(const float* q, const void* k, const void* v, WFormat kv, int64_t ld, const int64_t* ranges,
                 int n_ranges, int64_t D, float scale, float* out);
  // Elementwise maths, n values.
  void (*exp_)(float* x, int64_t n);      // x ← e^x
  void (*sigmoid_)(float* x, int64_t n);  // x ← 1 / (1 + e^-x)
  void (*tanh_)(float* x, int64_t n);
  void (*relu_square_)(float* x, int64_t n);  // x ← max(x, 0)²
  // out = (x − mean) / √(var + eps) · w + b over n values (LayerNorm, GroupNorm of one head); out may be x.
  void (*normalize)(const float* x, int64_t n, float eps, const float* w, const float* b, float* out);
  // Register-only FMA loop (the matrix-throughput ceiling of one core); returns a value to keep it alive.
  // Performs iters · kFmaPeakChains · lanes FMAs.
  float (*fma_peak)(int64_t iters);
  int lanes;  // fp32 lanes per vector
  // Prefill attention of one head: a group of queries against a block of nk key slots (slot j at k + j·ld
  // and v + j·ld, f32 or bf16), under an online softmax. The queries sit in lanes: qT [D][mp] (query q in
  // column q; mp a multiple of attn_lanes), running max m [mp], sum l [mp] and accumulators accT [D][mp]
  // are updated; query q sees the block's first valid[q] keys (0 for padding columns), or all nk keys when
  // valid is null (padding columns then hold zero queries, whose state is never read). s: scratch [nk][mp].
  void (*attend_block)(const float* qT, int64_t mp, int64_t D, const void* k, const void* v, WFormat kv, int64_t ld,
                       int64_t nk, const float* valid, float scale, float* s, float* m, float* l, float* accT);
  int attn_lanes;

  // AMX tile GEMMs (Isa::amx only; null elsewhere): C (+)= A · Wᵀ for bf16 or q8 W (int8 values are exact
  // in bf16; the row scales multiply the sums), as gemm_nt_packed. A is packed once per call as three
  // bf16 parts whose sum is each fp32 value exactly (hi, mid, lo: 8 + 8 + 8 significant bits), so every
  // product is exact and the tiles accumulate in fp32, like the FMA kernels.
  // tile_pack_a writes rows [r0, r1) of tile_a_rows(M) (rows ≥ M become zeros; threads may pack disjoint
  // ranges at once) into tile_a_size(M, K) uint16 values; tile_gemm_nt computes columns [n0, n1).
  int64_t (*tile_a_rows)(int64_t M) = nullptr;
  int64_t (*tile_a_size)(int64_t M, int64_t K) = nullptr;
  void (*tile_pack_a)(const float* A, int64_t lda, int64_t M, int64_t K, int64_t r0, int64_t r1,
                      uint16_t* packed) = nullptr;
  void (*tile_gemm_nt)(const uint16_t* packed, int64_t M, const WeightView& W, int64_t n0, int64_t n1, float* C,
                       int64_t ldc, bool accumulate) = nullptr;
  // The same for C (+)= A · W with W [K, N] as stored (gemm_nn: low-rank matrices).
  void (*tile_gemm_nn)(const uint16_t* packed, int64_t M, const WeightView& W, int64_t n0, int64_t n1, float* C,
                       int64_t ldc, bool accumulate) = nullptr;
  // Register-only tile multiply loop (the AMX ceiling of one core): iters · kTilePeakFlops FLOPs.
  float (*tile_peak)(int64_t iters) = nullptr;
};

constexpr int64_t kTilePeakFlops = 4 * 2 * 16 * 16 * 32;

constexpr int kFmaPeakChains = 12;

const Kernels& kernels_for(Isa isa);
const Kernels& scalar_kernels();
const Kernels& avx2_kernels();
const Kernels& avx512_kernels();
const Kernels& amx_kernels();  // the AVX-512 table plus the tile GEMM

}  // namespace rwkvx::cpu
