// Cross-checks the reference sparse-attention op against a second, independent formulation of spec
// model.md §5.3: dense attention with the MoBA mask (selected past chunks + causal own chunk), on fresh
// random inputs, several heads, chunk sizes and top-k, appended in uneven pieces.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "backend/ops.h"
#include "support/test_util.h"

namespace rwkvx {
namespace {

// Dense masked attention for query position t, head h, over all keys [0, L).
std::vector<float> masked_reference(const std::vector<float>& q, const std::vector<float>& k,
                                    const std::vector<float>& v, int64_t L, int64_t C, int64_t chunk, int top_k) {
  const int64_t D = 64, H = C / D;
  std::vector<float> out(size_t(L * C));
  for (int64_t t = 0; t < L; ++t) {
    const int64_t own = t / chunk;
    for (int64_t h = 0; h < H; ++h) {
      // Chunk scores against means, computed straight from k.
      std::vector<std::pair<double, int64_t>> sc;
      for (int64_t n = 0; n < own; ++n) {
        double s = 0;
        for (int64_t d = 0; d < D; ++d) {
          double mean = 0;
          for (int64_t r = n * chunk; r < (n + 1) * chunk; ++r) mean += k[size_t(r * C + h * D + d)];
          s += q[size_t(t * C + h * D + d)] * (mean / double(chunk));
        }
        sc.push_back({-s, n});  // sort ascending by -score, then index
      }
      std::sort(sc.begin(), sc.end());
      std::vector<bool> allowed(size_t(L), false);
      for (int64_t i = 0; i < std::min<int64_t>(top_k - 1, own); ++i)
        for (int64_t r = sc[size_t(i)].second * chunk; r < (sc[size_t(i)].second + 1) * chunk; ++r) allowed[size_t(r)] = true;
      for (int64_t r = own * chunk; r <= t; ++r) allowed[size_t(r)] = true;
      std::vector<double> logits(size_t(L), -INFINITY);
      double mx = -INFINITY;
      for (int64_t r = 0; r < L; ++r) {
        if (!allowed[size_t(r)]) continue;
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += double(q[size_t(t * C + h * D + d)]) * k[size_t(r * C + h * D + d)];
        logits[size_t(r)] = s / 8.0;
        mx = std::max(mx, logits[size_t(r)]);
      }
      double den = 0;
      for (int64_t r = 0; r < L; ++r) den += allowed[size_t(r)] ? std::exp(logits[size_t(r)] - mx) : 0.0;
      for (int64_t d = 0; d < D; ++d) {
        double acc = 0;
        for (int64_t r = 0; r < L; ++r)
          if (allowed[size_t(r)]) acc += std::exp(logits[size_t(r)] - mx) * v[size_t(r * C + h * D + d)];
        out[size_t(t * C + h * D + d)] = float(acc / den);
      }
    }
  }
  return out;
}

struct Shape {
  int64_t C, L;
  int chunk, top_k;
};

class SparseAttnRef : public testing::TestWithParam<Shape> {};

TEST_P(SparseAttnRef, MatchesMaskedDenseAttention) {
  const Shape sh = GetParam();
  const uint32_t seed = uint32_t(sh.C * 1000 + sh.L * 7 + sh.chunk * 13 + sh.top_k);
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> q(size_t(sh.L * sh.C)), k(q.size()), v(q.size());
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) e = nd(rng);
  auto be = make_reference_backend();
  SparseAttnParams p;
  p.chunk = sh.chunk;
  p.top_k = sh.top_k;
  KvCache cache;
  std::vector<float> got(q.size());
  // Feed in uneven pieces: the op must give the same rows whatever the call boundaries.
  for (int64_t t0 = 0, n = 1; t0 < sh.L; t0 += n, n = n % 5 + 3) {
    n = std::min(n, sh.L - t0);
    Tensor tq = be->alloc(DType::f32, {n, sh.C}), tk = be->alloc(DType::f32, {n, sh.C}),
           tv = be->alloc(DType::f32, {n, sh.C}), to = be->alloc(DType::f32, {n, sh.C});
    be->from_host(q.data() + t0 * sh.C, tq);
    be->from_host(k.data() + t0 * sh.C, tk);
    be->from_host(v.data() + t0 * sh.C, tv);
    be->kv_append(cache, tk, tv, p.chunk);
    be->sparse_attention(tq, cache, p, to);
    be->to_host(to, got.data() + t0 * sh.C);
  }
  EXPECT_EQ(cache.len, sh.L);
  EXPECT_EQ(cache.n_chunks, sh.L / sh.chunk);
  std::vector<float> ref = masked_reference(q, k, v, sh.L, sh.C, sh.chunk, sh.top_k);
  EXPECT_LE(test::rel_max_err(got, ref), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Shapes, SparseAttnRef,
                         testing::Values(Shape{64, 40, 4, 3}, Shape{128, 57, 8, 3}, Shape{192, 50, 5, 2},
                                         Shape{256, 45, 3, 4}, Shape{128, 33, 16, 3}, Shape{64, 12, 1, 1}));

// Exact ties in the gate pick the lower chunk index (spec §5.2).
TEST(SparseAttnRef, TiesPickLowerChunk) {
  auto be = make_reference_backend();
  const int64_t C = 64, c = 2;
  // Chunks 0, 1 and 2 have identical keys (equal scores); chunk 3 is the own chunk of the last query.
  // Values differ per chunk so the output reveals which chunk was chosen.
  const int64_t L = 7;
  std::vector<float> k(size_t(L * C), 0.5f), v(size_t(L * C)), q(size_t(C), 1.0f);
  for (int64_t r = 0; r < L; ++r)
    for (int64_t d = 0; d < C; ++d) v[size_t(r * C + d)] = float(r / c);
  Tensor tk = be->alloc(DType::f32, {L, C}), tv = be->alloc(DType::f32, {L, C});
  be->from_host(k.data(), tk);
  be->from_host(v.data(), tv);
  KvCache cache;
  be->kv_append(cache, tk, tv, int(c));
  SparseAttnParams p;
  p.chunk = int(c);
  p.top_k = 2;  // one past chunk: the tie between 0, 1, 2 must choose chunk 0
  Tensor tq = be->alloc(DType::f32, {1, C}), out = be->alloc(DType::f32, {1, C});
  be->from_host(q.data(), tq);
  be->sparse_attention(tq, cache, p, out);
  // Keys are all equal, so softmax is uniform over {chunk 0 (2 rows, value 0), own chunk 3 (1 row, value 3)}.
  std::vector<float> o(static_cast<size_t>(C));
  be->to_host(out, o.data());
  EXPECT_NEAR(o[0], 1.0f, 1e-6);  // (0 + 0 + 3) / 3
}

}  // namespace
}  // namespace rwkvx
