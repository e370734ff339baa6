// compare_quality (runtime/quality.h), the engine of `rwkvx quality`: identical models compare as
// identical; int8 weights and a bf16 KV cache show a small, nonzero cost; bad input is refused.
#include <gtest/gtest.h>

#include "backend/cpu/cpu_backend.h"
#include "runtime/quality.h"
#include "support/random_model.h"
#include "support/run_cli.h"

namespace rwkvx {
namespace {

RandomModelSpec spec() {
  RandomModelSpec s;
  s.n_embd = 128, s.n_rwkv = 2, s.n_sparse = 1, s.dtype = DType::bf16, s.seed = 61;
  return s;
}

TEST(Quality, IdenticalModelsCompareEqual) {
  auto be = make_cpu_backend();
  ModelOptions o;
  o.chunk = 8;
  auto a = test::load_random_model(spec(), o, *be), b = test::load_random_model(spec(), o, *be);
  const std::vector<int32_t> ids = test::random_tokens(150, spec().n_vocab, 3);
  const QualityReport r = compare_quality(*a, *b, ids, false);
  EXPECT_EQ(r.positions, 149);
  EXPECT_EQ(r.logit_rel_max_err, 0.0);
  EXPECT_EQ(r.top1_agreement, 1.0);
  EXPECT_EQ(r.loss_exact, r.loss_lossy);
  EXPECT_GT(r.loss_exact, 0.0);
}

TEST(Quality, Int8AndBf16KvCostLittleButNotNothing) {
  CpuBackendOptions q;
  q.quantize_int8 = true;
  auto be = make_cpu_backend(), be8 = make_cpu_backend(q);
  ModelOptions o, half;
  o.chunk = half.chunk = 8;
  half.kv_dtype = DType::bf16;
  auto exact = test::load_random_model(spec(), o, *be);
  auto int8 = test::load_random_model(spec(), o, *be8);
  auto kv16 = test::load_random_model(spec(), half, *be);
  const std::vector<int32_t> ids = test::random_tokens(60, spec().n_vocab, 4);
  for (bool decode : {false, true}) {
    for (const Model* lossy : {int8.get(), kv16.get()}) {
      const QualityReport r = compare_quality(*exact, *lossy, ids, decode);
      EXPECT_GT(r.logit_rel_max_err, 0.0);
      EXPECT_LT(r.logit_rel_max_err, 0.2);
      EXPECT_GT(r.top1_agreement, 0.8);
      EXPECT_NEAR(r.loss_lossy, r.loss_exact, 0.05 * r.loss_exact);
    }
  }
}

TEST(Quality, RefusesTooShortTextAndNoLossyOption) {
  auto be = make_cpu_backend();
  ModelOptions o;
  auto a = test::load_random_model(spec(), o, *be);
  EXPECT_THROW(compare_quality(*a, *a, {5}, false), Error);
  test::TempDir dir;
  const auto r = test::run_rwkvx(dir, {"quality", "-m", "missing.safetensors", "--text", "x.txt"});
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.stderr_text.find("nothing to compare"), std::string::npos) << r.stderr_text;
}

}  // namespace
}  // namespace rwkvx
