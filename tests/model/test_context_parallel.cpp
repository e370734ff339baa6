// Context-parallel prefill (runtime/context_parallel.h) without a GPU: the segment plan, and W ranks run
// one after another through an in-memory link, whose last rank's logits and state must equal
// Model::forward over the whole sequence bit for bit (same windows, same ops, same state).
#include <gtest/gtest.h>

#include <cstring>

#include "backend/cpu/cpu_backend.h"
#include "runtime/context_parallel.h"
#include "support/memory_link.h"
#include "support/random_model.h"

namespace rwkvx {
namespace {

using test::host;
using test::load_random_model;
using test::random_tokens;

TEST(ContextParallelPlan, BoundariesAreAlignedAndCoverTheSequence) {
  for (int64_t T : {4096, 4097, 10000, 1 << 20}) {
    for (int W : {1, 2, 3}) {
      const auto p = plan_segments(T, W, 1024);
      ASSERT_EQ(p.size(), size_t(W));
      EXPECT_EQ(p.front().begin, 0);
      EXPECT_EQ(p.back().end, T);
      for (int r = 0; r < W; ++r) {
        EXPECT_EQ(p[size_t(r)].begin % 1024, 0);
        EXPECT_GT(p[size_t(r)].size(), 0);
        if (r > 0) {
          EXPECT_EQ(p[size_t(r)].begin, p[size_t(r) - 1].end);
        }
      }
    }
  }
  auto p = plan_segments(1 << 20, 2, 4096);  // the 1M-token run: two halves
  EXPECT_EQ(p[0].end, 1 << 19);
  p = plan_segments(5 * 100 + 7, 3, 100);  // 5 units: 2, 2, 1 (+ the 7 left over)
  EXPECT_EQ(p[0].size(), 200);
  EXPECT_EQ(p[1].size(), 200);
  EXPECT_EQ(p[2].size(), 107);
}

TEST(ContextParallelPlan, CostSlopeGivesEarlierRanksMoreTokens) {
  const int64_t T = 1 << 20;
  auto p = plan_segments(T, 2, 4096, 1.2);  // cost 1 + 1.2 t/T: half the cost at t ≈ 0.59 T
  EXPECT_EQ(p[0].end % 4096, 0);
  EXPECT_NEAR(double(p[0].end) / T, 0.59, 0.01);
  p = plan_segments(T, 4, 4096, 3.0);
  for (int r = 1; r < 4; ++r) {
    EXPECT_LT(p[size_t(r)].begin, p[size_t(r)].end);
    EXPECT_EQ(p[size_t(r)].begin % 4096, 0);
    if (r > 1) {
      EXPECT_LT(p[size_t(r)].size(), p[size_t(r) - 1].size());
    }
  }
  p = plan_segments(3 * 16, 3, 16, 1000.0);  // extreme slopes still leave every rank a unit
  for (const CpSegment& s : p) EXPECT_EQ(s.size(), 16);
  EXPECT_THROW(plan_segments(T, 2, 4096, -1), Error);
}

TEST(ContextParallelPlan, BadSizesAreErrors) {
  EXPECT_THROW(plan_segments(0, 1, 16), Error);
  EXPECT_THROW(plan_segments(100, 0, 16), Error);
  EXPECT_THROW(plan_segments(100, 2, 0), Error);
  EXPECT_EQ(plan_segments(15, 1, 16).back().end, 15);  // one rank: no alignment needed
  EXPECT_THROW(plan_segments(31, 2, 16), Error);   // one whole unit for 2 ranks
  EXPECT_THROW(plan_segments(47, 3, 16), Error);   // 2 units for 3 ranks
  EXPECT_NO_THROW(plan_segments(48, 3, 16));
  try {
    plan_segments(4096, 2, 4096);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fewer than the 2 ranks"), std::string::npos) << e.what();
  }
}

TEST(ContextParallelPlan, AlignmentIsChunkAndWindow) {
  ModelConfig c;
  c.n_sparse = 2;
  c.sparse.chunk = 2048;
  c.max_rows_per_call = 4096;
  EXPECT_EQ(cp_alignment(c), 4096);
  c.sparse.chunk = 8, c.max_rows_per_call = 12;
  EXPECT_EQ(cp_alignment(c), 24);
  c.n_sparse = 0;
  EXPECT_EQ(cp_alignment(c), 12);
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void expect_same_state(Backend& be, const State& a, const State& b) {
  for (size_t i = 0; i < a.wkv.size(); ++i) {
    EXPECT_TRUE(same_bits(host(be, a.wkv[i]), host(be, b.wkv[i]))) << "wkv " << i;
    EXPECT_TRUE(same_bits(host(be, a.att_shift[i]), host(be, b.att_shift[i]))) << "att_shift " << i;
  }
  for (size_t i = 0; i < a.ffn_shift.size(); ++i)
    EXPECT_TRUE(same_bits(host(be, a.ffn_shift[i]), host(be, b.ffn_shift[i]))) << "ffn_shift " << i;
  for (size_t m = 0; m < a.kv.size(); ++m) {
    const KvCache &x = a.kv[m][0], &y = b.kv[m][0];
    ASSERT_EQ(x.len, y.len);
    ASSERT_EQ(x.n_chunks, y.n_chunks);
    EXPECT_TRUE(same_bits(host(be, x.k.rows_view(0, x.len)), host(be, y.k.rows_view(0, y.len)))) << "k " << m;
    EXPECT_TRUE(same_bits(host(be, x.v.rows_view(0, x.len)), host(be, y.v.rows_view(0, y.len)))) << "v " << m;
    if (x.n_chunks) {
      EXPECT_TRUE(same_bits(host(be, x.chunk_mean.rows_view(0, x.n_chunks)),
                            host(be, y.chunk_mean.rows_view(0, y.n_chunks)))) << "means " << m;
    }
  }
  EXPECT_EQ(a.pos, b.pos);
}

struct CpCase {
  const char* backend;
  int chunk, max_rows;
  int64_t T;
  DType kv;
};

class ContextParallelTest : public testing::TestWithParam<CpCase> {};

TEST_P(ContextParallelTest, RanksInSequenceEqualTheWholeForward) {
  const CpCase& c = GetParam();
  std::unique_ptr<Backend> be = std::string(c.backend) == "reference" ? make_reference_backend() : make_cpu_backend();
  RandomModelSpec s;
  s.n_embd = 128, s.n_rwkv = 4, s.n_sparse = 2, s.seed = 21;
  ModelOptions opt;
  opt.chunk = c.chunk, opt.top_k = 3, opt.kv_dtype = c.kv, opt.max_rows_per_call = c.max_rows;
  auto model = load_random_model(s, opt, *be);
  const std::vector<int32_t> ids = random_tokens(c.T, s.n_vocab, 5);
  State whole = model->new_state(1);
  const std::vector<float> ref = host(*be, model->forward(ids.data(), SeqBatch::single(c.T), whole, LogitsMode::last));
  const int64_t units = c.T / cp_alignment(model->config());
  for (int W = 1; W <= std::min<int64_t>(4, units); ++W) {
    SCOPED_TRACE("world " + std::to_string(W));
    test::Mailbox box;
    std::vector<float> got;
    State last;
    for (int r = 0; r < W; ++r) {
      test::MemoryLink link(*be, r, box);
      State st = model->new_state(1);
      Tensor l = context_parallel_prefill(*model, ids.data(), c.T, r, W, &link, st, nullptr, W == 3 ? 2.0 : 0.0);
      if (r == W - 1) got = host(*be, l), last = std::move(st);
    }
    for (auto& [k, q] : box) EXPECT_TRUE(q.empty());
    EXPECT_TRUE(same_bits(got, ref));
    expect_same_state(*be, last, whole);
  }
}

INSTANTIATE_TEST_SUITE_P(Random, ContextParallelTest,
                         testing::Values(CpCase{"reference", 8, 16, 100, DType::f32},
                                         CpCase{"cpu", 8, 16, 100, DType::f32},
                                         CpCase{"cpu", 8, 12, 101, DType::bf16},
                                         CpCase{"cpu", 16, 64, 300, DType::f32}),
                         [](const testing::TestParamInfo<CpCase>& i) {
                           return std::string(i.param.backend) + "_c" + std::to_string(i.param.chunk) + "_r" +
                                  std::to_string(i.param.max_rows) + (i.param.kv == DType::bf16 ? "_kvbf16" : "");
                         });

TEST(ContextParallel, RefusesEvictionAndMissingLink) {
  auto be = make_reference_backend();
  RandomModelSpec s;
  s.n_embd = 64, s.n_rwkv = 1, s.n_sparse = 1, s.seed = 3;
  ModelOptions opt;
  opt.chunk = 4, opt.max_rows_per_call = 8;
  auto model = load_random_model(s, opt, *be);
  const std::vector<int32_t> ids = random_tokens(32, s.n_vocab, 1);
  State st = model->new_state(1);
  EXPECT_THROW(context_parallel_prefill(*model, ids.data(), 32, 0, 2, nullptr, st), Error);
  opt.eviction.max_len = 16, opt.eviction.window = 4, opt.eviction.min_len = 8;
  auto ev = load_random_model(s, opt, *be);
  State st2 = ev->new_state(1);
  EXPECT_THROW(context_parallel_prefill(*ev, ids.data(), 32, 0, 1, nullptr, st2), Error);
}

}  // namespace
}  // namespace rwkvx
