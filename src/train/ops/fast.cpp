#include "train/ops/fast.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "backend/cpu/kernels.h"
#include "train/ops/parallel.h"

#ifdef RWKVX_HAVE_OPENBLAS
#include <cblas.h>
#endif

namespace rwkvx::train::fast {
namespace {

// Tile sizes (fixed: the results must not depend on the thread count). 256 × 512 outputs keep each
// call big enough for the GEMM's packing to pay off and give the 65536-row head hundreds of tiles.
constexpr int64_t kTileM = 256, kTileN = 512;
// A long reduction with few output tiles (the head's dx: K = vocab, M × N = rows × C) is cut into fixed
// pieces of kPieceK, summed afterwards in piece order, so it still spreads over the threads.
constexpr int64_t kPieceK = 8192;

const cpu::Kernels& kern() {
  static const cpu::Kernels& k = cpu::kernels_for(active_isa());
  return k;
}

#ifdef RWKVX_HAVE_OPENBLAS
void init_openblas() {
  // Threads come from our pool, one single-threaded call per tile: OpenBLAS's own threads would split
  // a call in a machine-dependent way and compete with ours.
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}
#endif

// One tile on the calling thread. Without OpenBLAS the operands must be A [m, k] and B stored [n, k].
void tile_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
               int64_t ldb, float* C, int64_t ldc, bool accumulate) {
#ifdef RWKVX_HAVE_OPENBLAS
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(m), int(n), int(k),
              1.0f, A, int(lda), B, int(ldb), accumulate ? 1.0f : 0.0f, C, int(ldc));
#else
  (void)ta, (void)tb;
  cpu::WeightView w;
  w.fmt = cpu::WFormat::f32;
  w.data = B;
  w.rows = n, w.cols = k, w.ld = ldb;
  kern().gemm_nt(A, lda, m, w, 0, n, C, ldc, accumulate);
#endif
}

#ifndef RWKVX_HAVE_OPENBLAS
// out[c, r] = in[r, c] for in [rows, cols] with row stride ld (a pure copy: any split gives the same).
void transpose(const float* in, int64_t ld, int64_t rows, int64_t cols, float* out) {
  constexpr int64_t B = 64;
  parallel_tasks(n_pieces(cols, B), double(rows * cols) / 4, [&](int64_t p) {
    const int64_t c0 = p * B, c1 = std::min(cols, c0 + B);
    for (int64_t r0 = 0; r0 < rows; r0 += 16)
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < std::min(rows, r0 + 16); ++r) out[c * rows + r] = in[r * ld + c];
  });
}
#endif

}  // namespace

const char* gemm_name() {
#ifdef RWKVX_HAVE_OPENBLAS
  return "openblas";
#else
  static const std::string n = std::string("rwkvx-") + isa_name(kern().isa);
  return n.c_str();
#endif
}

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
    return;
  }
#ifdef RWKVX_HAVE_OPENBLAS
  init_openblas();
#else
  // The backend's packed kernel computes A · Bᵀ: bring transposed operands into that form first
  // (O(M·K + N·K) copies against O(M·N·K) multiply-adds).
  std::vector<float> at, bt;
  if (ta) {
    at.resize(size_t(M * K));
    transpose(A, lda, K, M, at.data());
    A = at.data(), lda = K, ta = false;
  }
  if (!tb) {
    bt.resize(size_t(N * K));
    transpose(B, ldb, K, N, bt.data());
    B = bt.data(), ldb = K, tb = true;
  }
#endif
  const int64_t mt = n_pieces(M, kTileM), nt = n_pieces(N, kTileN);
  const int64_t kp = mt * nt < 8 && K >= 2 * kPieceK ? n_pieces(K, kPieceK) : 1;
  // Operand pointers of the tile (rows m0.., columns n0.., reduction k0..).
  auto a_at = [&](int64_t m0, int64_t k0) { return ta ? A + k0 * lda + m0 : A + m0 * lda + k0; };
  auto b_at = [&](int64_t k0, int64_t n0) { return tb ? B + n0 * ldb + k0 : B + k0 * ldb + n0; };
  const double work = double(M) * double(N) * double(K);
  if (kp == 1) {
    parallel_tasks(mt * nt, work, [&](int64_t i) {
      const int64_t m0 = i / nt * kTileM, n0 = i % nt * kTileN;
      const int64_t m = std::min(kTileM, M - m0), n = std::min(kTileN, N - n0);
      tile_gemm(ta, tb, m, n, K, a_at(m0, 0), lda, b_at(0, n0), ldb, C + m0 * ldc + n0, ldc, accumulate);
    });
    return;
  }
  std::vector<float> part(size_t(kp * M * N));
  parallel_tasks(kp * mt * nt, work, [&](int64_t i) {
    const int64_t p = i / (mt * nt), r = i % (mt * nt);
    const int64_t m0 = r / nt * kTileM, n0 = r % nt * kTileN, k0 = p * kPieceK;
    const int64_t m = std::min(kTileM, M - m0), n = std::min(kTileN, N - n0), k = std::min(kPieceK, K - k0);
    tile_gemm(ta, tb, m, n, k, a_at(m0, k0), lda, b_at(k0, n0), ldb, part.data() + p * M * N + m0 * N + n0, N, false);
  });
  parallel_tasks(M, double(M * N * kp), [&](int64_t m) {
    float* c = C + m * ldc;
    for (int64_t n = 0; n < N; ++n) {
      float s = accumulate ? c[n] : 0.0f;
      for (int64_t p = 0; p < kp; ++p) s += part[size_t(p * M * N + m * N + n)];
      c[n] = s;
    }
  });
}

namespace {

// Row maximum with 8 independent lanes (vectorizable; max is exact, so the order does not matter).
float row_max_of(const float* l, int64_t V) {
  float m[8];
  std::fill(m, m + 8, -INFINITY);
  int64_t i = 0;
  for (; i + 8 <= V; i += 8)
    for (int j = 0; j < 8; ++j) m[j] = l[i + j] > m[j] ? l[i + j] : m[j];
  for (; i < V; ++i) m[0] = l[i] > m[0] ? l[i] : m[0];
  return *std::max_element(m, m + 8);
}

// Σ e[i] in double over 8 fixed lanes, combined in a fixed order.
double sum_f64(const float* e, int64_t n) {
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += double(e[i + j]);
  for (; i < n; ++i) s[0] += double(e[i]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

constexpr int64_t kRowsPerTask = 4;

}  // namespace

void cross_entropy_rows(const float* logits, const int32_t* targets, int64_t T, int64_t V, double* loss, double* lse,
                        double* row_max) {
  parallel_tasks(n_pieces(T, kRowsPerTask), double(T * V) * 8, [&](int64_t p) {
    thread_local std::vector<float> e;
    e.resize(size_t(V));
    for (int64_t t = p * kRowsPerTask; t < std::min(T, (p + 1) * kRowsPerTask); ++t) {
      const float* l = logits + t * V;
      const float mx = row_max_of(l, V);
      for (int64_t i = 0; i < V; ++i) e[size_t(i)] = l[i] - mx;
      kern().exp_(e.data(), V);
      lse[t] = double(mx) + std::log(sum_f64(e.data(), V));
      loss[t] = targets[t] < 0 ? 0.0 : lse[t] - double(l[targets[t]]);
      row_max[t] = mx;
    }
  });
}

void cross_entropy_grad_rows(float* logits, const int32_t* targets, const double* lse, const double* coef,
                             double l2_scale, int64_t l2_first, int64_t T, int64_t V) {
  parallel_tasks(n_pieces(T, kRowsPerTask), double(T * V) * 8, [&](int64_t p) {
    for (int64_t t = p * kRowsPerTask; t < std::min(T, (p + 1) * kRowsPerTask); ++t) {
      float* l = logits + t * V;
      int64_t am = -1;
      float lm = 0;
      if (l2_scale != 0 && t >= l2_first) {
        lm = row_max_of(l, V);
        am = std::find(l, l + V, lm) - l;
      }
      if (targets[t] < 0 || coef[t] == 0) {
        std::fill(l, l + V, 0.0f);
      } else {
        const float shift = float(lse[t]), c = float(coef[t]);
        for (int64_t i = 0; i < V; ++i) l[i] -= shift;
        kern().exp_(l, V);
        for (int64_t i = 0; i < V; ++i) l[i] *= c;
        l[targets[t]] -= c;
      }
      if (am >= 0) l[am] += float(double(lm) * l2_scale);
    }
  });
}

}  // namespace rwkvx::train::fast
