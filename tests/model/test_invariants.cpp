// Invariants of spec model.md §6 on fresh random models (not only the golden ones): token-by-token
// decode equals one prefill, a prefill split anywhere equals the whole, at lengths that cross chunk
// boundaries and the KV-cache limit. They hold exactly when eviction is off (the default); with the
// official eviction policy on they hold only until the first eviction, which the last tests pin down.
#include <gtest/gtest.h>

#include "backend/cpu/cpu_backend.h"
#include "support/random_model.h"

namespace rwkvx {
namespace {

using test::load_random_model;
using test::random_tokens;
using test::rel_max_err;
using test::run_pieces;
using test::state_diff;

struct InvCase {
  const char* label;
  RandomModelSpec spec;
  int chunk, top_k;
  int64_t T;
  DType kv = DType::f32;       // KV-cache precision
  int64_t max_rows = 512;      // rows per internal forward call
};

// Shapes chosen to hit: plain RWKV-7, one head of 64, 2-4 heads, sparse block last (n_sparse = 1),
// interleaved sparse blocks, top-k 2/3/4, partial last chunk, bf16 weights, a bf16 KV cache, and long
// calls run internally in pieces of a few rows.
std::vector<InvCase> cases() {
  std::vector<InvCase> v;
  RandomModelSpec s;
  s = {}; s.n_embd = 64; s.n_rwkv = 3; s.seed = 11;
  v.push_back({"rwkv7_C64", s, 16, 3, 70});
  s = {}; s.n_embd = 128; s.n_rwkv = 4; s.n_sparse = 2; s.seed = 12;
  v.push_back({"rwkvx_C128_interleaved_c8_k3", s, 8, 3, 75});
  s = {}; s.n_embd = 192; s.n_rwkv = 2; s.n_sparse = 1; s.seed = 13;
  v.push_back({"rwkvx_C192_last_c5_k2", s, 5, 2, 53});
  s = {}; s.n_embd = 256; s.n_rwkv = 2; s.n_sparse = 2; s.dtype = DType::bf16; s.seed = 14;
  v.push_back({"rwkvx_C256_bf16_c7_k4", s, 7, 4, 61});
  s = {}; s.n_embd = 64; s.n_rwkv = 1; s.n_sparse = 1; s.seed = 15;
  v.push_back({"rwkvx_C64_c1_k1", s, 1, 1, 20});  // degenerate: own token only
  s = {}; s.n_embd = 128; s.n_rwkv = 2; s.n_sparse = 2; s.seed = 16;
  v.push_back({"rwkvx_C128_kvbf16_c6_k3", s, 6, 3, 50, DType::bf16});
  s = {}; s.n_embd = 128; s.n_rwkv = 2; s.n_sparse = 1; s.seed = 17;
  v.push_back({"rwkvx_C128_pieces7_c8_k3", s, 8, 3, 60, DType::f32, 7});
  return v;
}

// The reference backend is exactly invariant (same loops for every split); the fast CPU backend takes
// different kernels for decode (GEMV, per-query attention) and prefill (packed GEMM, grouped attention),
// so its splits agree to fp32 rounding. With a bf16 KV cache those fp32-rounding differences in a key can
// land on opposite sides of a bf16 rounding boundary: cached rows then differ by one bf16 ulp (2^-8
// relative), and the logits by that much attenuated.
struct InvParam {
  InvCase c;
  std::string backend;
};

class InvariantTest : public testing::TestWithParam<InvParam> {
 protected:
  bool exact() const { return GetParam().backend == "reference"; }
  bool kv_half() const { return GetParam().c.kv == DType::bf16; }
  double tol() const { return exact() ? 1e-6 : kv_half() ? 1e-3 : 2e-5; }
  double state_tol() const { return exact() ? 1e-6 : kv_half() ? 1.0 / 128 : 2e-5; }
  void SetUp() override {
    const InvCase& c = GetParam().c;
    be = GetParam().backend == "reference" ? make_reference_backend() : make_cpu_backend();
    ModelOptions opt;
    opt.chunk = c.chunk;
    opt.top_k = c.top_k;
    opt.kv_dtype = c.kv;
    opt.max_rows_per_call = c.max_rows;
    model = load_random_model(c.spec, opt, *be);
    ids = random_tokens(c.T, c.spec.n_vocab, c.spec.seed * 7);
  }
  std::unique_ptr<Backend> be;
  std::unique_ptr<Model> model;
  std::vector<int32_t> ids;
};

TEST_P(InvariantTest, DecodeEqualsPrefill) {
  const int64_t T = int64_t(ids.size());
  State whole = model->new_state(), steps = model->new_state();
  std::vector<float> a = run_pieces(*model, whole, ids, {T});
  std::vector<float> b = run_pieces(*model, steps, ids, std::vector<int64_t>(size_t(T), 1));
  EXPECT_LE(rel_max_err(b, a), tol());
  EXPECT_LE(state_diff(*be, steps, whole), state_tol());
}

TEST_P(InvariantTest, SplitPrefillEqualsWhole) {
  const int64_t T = int64_t(ids.size());
  State whole = model->new_state();
  std::vector<float> ref = run_pieces(*model, whole, ids, {T});
  std::mt19937 rng(unsigned(GetParam().c.spec.seed));
  for (int trial = 0; trial < 6; ++trial) {
    // Cut points: random, plus (in odd trials) exactly on a chunk boundary.
    std::vector<int64_t> cuts = {int64_t(rng() % uint32_t(T - 1)) + 1, int64_t(rng() % uint32_t(T - 1)) + 1};
    if (trial % 2) cuts.push_back(std::min<int64_t>(T - 1, GetParam().c.chunk * (1 + trial)));
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    std::vector<int64_t> pieces;
    int64_t prev = 0;
    for (int64_t c : cuts) pieces.push_back(c - prev), prev = c;
    pieces.push_back(T - prev);
    State st = model->new_state();
    std::vector<float> got = run_pieces(*model, st, ids, pieces);
    SCOPED_TRACE("trial " + std::to_string(trial) + ", first cut " + std::to_string(cuts[0]));
    EXPECT_LE(rel_max_err(got, ref), tol());
    EXPECT_LE(state_diff(*be, st, whole), state_tol());
  }
}

TEST_P(InvariantTest, OutputRowDependsOnlyOnPrefix) {
  const int64_t T = int64_t(ids.size()), V = model->config().n_vocab;
  State s1 = model->new_state(), s2 = model->new_state();
  std::vector<float> a = run_pieces(*model, s1, ids, {T});
  std::vector<int32_t> changed = ids;
  changed[size_t(T / 2)] = (changed[size_t(T / 2)] + 1) % int32_t(V);
  std::vector<float> b = run_pieces(*model, s2, changed, {T});
  std::vector<float> a0(a.begin(), a.begin() + (T / 2) * V), b0(b.begin(), b.begin() + (T / 2) * V);
  // Bit-identical on the reference. On the fast backend the later tokens change how many queries share a
  // chunk, which picks the GEMV or the packed kernel for earlier rows too: equal up to fp32 rounding.
  if (GetParam().backend == "reference") {
    EXPECT_EQ(a0, b0);
  } else {
    EXPECT_LE(rel_max_err(b0, a0), 1e-6);
  }
  EXPECT_GT(rel_max_err(b, a), 1e-3);
}

std::vector<InvParam> params() {
  std::vector<InvParam> v;
  for (const InvCase& c : cases())
    for (const char* b : {"reference", "cpu"}) v.push_back({c, b});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Random, InvariantTest, testing::ValuesIn(params()),
                         [](const auto& i) { return std::string(i.param.c.label) + "_" + i.param.backend; });

// Beyond the official KV limit (20000 rows): with eviction off the cache keeps every row and a split
// prefill still equals the whole.
TEST(InvariantLong, SplitBeyondOfficialKvLimit) {
  auto be = make_reference_backend();
  RandomModelSpec s;
  s.n_vocab = 64, s.n_embd = 64, s.n_rwkv = 1, s.n_sparse = 1, s.seed = 21;
  ModelOptions opt;
  opt.chunk = 256;
  opt.top_k = 3;
  auto m = load_random_model(s, opt, *be);
  const int64_t T = 20100;
  std::vector<int32_t> ids = random_tokens(T, s.n_vocab, 5);
  State whole = m->new_state(), split = m->new_state();
  std::vector<float> a = run_pieces(*m, whole, ids, {T});
  std::vector<float> b = run_pieces(*m, split, ids, {19999, 2, 99});
  EXPECT_LE(rel_max_err(b, a), 1e-6);
  EXPECT_EQ(whole.kv[0][0].len, T);
  EXPECT_LE(state_diff(*be, split, whole), 1e-6);
}

// The official eviction policy (§7.4), with small limits: the cache is bounded exactly as the policy
// says, results equal the exact path until the first eviction and differ after it.
TEST(InvariantEviction, BoundedCacheAndExactUntilFirstEviction) {
  auto be = make_reference_backend();
  RandomModelSpec s;
  s.n_embd = 128, s.n_rwkv = 2, s.n_sparse = 2, s.seed = 31;
  ModelOptions exact, evict;
  exact.chunk = evict.chunk = 4;
  exact.top_k = evict.top_k = 2;
  evict.eviction = {40, 8, 32};  // max, window, keep
  auto me = load_random_model(s, exact, *be), mv = load_random_model(s, evict, *be);
  const int64_t T = 90, V = s.n_vocab;
  std::vector<int32_t> ids = random_tokens(T, V, 9);
  State se = me->new_state(), sv = mv->new_state();
  std::vector<float> a = run_pieces(*me, se, ids, std::vector<int64_t>(size_t(T), 1));
  std::vector<float> b(size_t(T * V));
  int64_t first_evict = -1;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t before = sv.kv[0][0].len;
    Tensor l = mv->forward(ids.data() + t, SeqBatch::single(1), sv, LogitsMode::all);
    std::vector<float> h = test::host(*be, l);
    std::copy(h.begin(), h.end(), b.begin() + t * V);
    const int64_t after = sv.kv[0][0].len;
    // Decode: when the cache holds more than 40 rows it is cut to 32 before the new row is appended.
    EXPECT_EQ(after, before > 40 ? 33 : before + 1) << "t=" << t;
    EXPECT_LE(after, 41);
    if (before > 40 && first_evict < 0) first_evict = t;
  }
  ASSERT_EQ(first_evict, 41);
  std::vector<float> a0(a.begin(), a.begin() + first_evict * V), b0(b.begin(), b.begin() + first_evict * V);
  EXPECT_LE(rel_max_err(b0, a0), 1e-6);
  std::vector<float> a1(a.begin() + first_evict * V, a.end()), b1(b.begin() + first_evict * V, b.end());
  EXPECT_GT(rel_max_err(b1, a1), 1e-4) << "eviction must change results after it triggers";
}

// With eviction configured but never triggered, results are the exact ones.
TEST(InvariantEviction, UntriggeredEvictionIsExact) {
  auto be = make_reference_backend();
  RandomModelSpec s;
  s.n_embd = 128, s.n_rwkv = 2, s.n_sparse = 1, s.seed = 32;
  ModelOptions exact, evict;
  exact.chunk = evict.chunk = 4;
  evict.eviction = {100, 8, 32};
  auto me = load_random_model(s, exact, *be), mv = load_random_model(s, evict, *be);
  std::vector<int32_t> ids = random_tokens(60, s.n_vocab, 3);
  State se = me->new_state(), sv = mv->new_state();
  EXPECT_EQ(run_pieces(*me, se, ids, {60}), run_pieces(*mv, sv, ids, {60}));
}

}  // namespace
}  // namespace rwkvx
