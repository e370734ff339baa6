// The fp32 fast path of the training ops: the dense products through a packed SIMD GEMM (OpenBLAS when
// the build found it, else the CPU backend's own kernels, src/backend/cpu), the head's cross-entropy with
// vectorized exponentials, and threads inside one sequence's ops (parallel.h). The templated ops in
// linear.h and embedding.h route S = float here; S = double keeps the plain double-accumulating loops,
// the exact oracle of the fp64 gradient checks.
//
// Determinism: every product is cut into tiles whose boundaries depend only on the shapes; a tile is one
// single-threaded GEMM call (same call, same bits), and when the reduction dimension is split, the
// partial sums are added in a fixed order. The results are therefore identical for any thread count.
#pragma once
#include <cstdint>

namespace rwkvx::train::fast {

// C[M, N] = op(A) · op(B) (accumulate: C +=). Row-major: A is [M, K] (ta: stored [K, M]) with row
// stride lda; B is [K, N] (tb: stored [N, K]) with row stride ldb; C row stride ldc.
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate);

// Which GEMM the build uses: "openblas" or "rwkvx-<isa>".
const char* gemm_name();

// Per row t of logits [T, V]: lse[t] = log Σ exp, loss[t] = lse[t] − logits[t, target[t]] (0 where
// target < 0), row_max[t] = max (sums in double; exponentials in fp32).
void cross_entropy_rows(const float* logits, const int32_t* targets, int64_t T, int64_t V, double* loss, double* lse,
                        double* row_max);

// In place, per row t: logits[t] ← coef[t] (softmax − onehot(target[t])) (0 when coef is 0 or the target
// is ignored), plus, for t ≥ l2_first and l2_scale ≠ 0, the L2Wrap gradient max · l2_scale at the first
// argmax of the row (taken before the overwrite).
void cross_entropy_grad_rows(float* logits, const int32_t* targets, const double* lse, const double* coef,
                             double l2_scale, int64_t l2_first, int64_t T, int64_t V);

}  // namespace rwkvx::train::fast
