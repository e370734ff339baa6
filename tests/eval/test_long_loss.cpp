// Long-context loss (spec system.md §5.2): per-token losses equal a direct computation from one forward,
// the shared-run bucketing equals the official separate runs per S, documents load from every format.
#include <gtest/gtest.h>

#include <cmath>

#include "eval/eval_test_util.h"
#include "eval/long_loss.h"
#include "support/random_model.h"
#include "train/data/binidx.h"

namespace rwkvx {
namespace {

// log softmax by hand, in double, from one forward of the whole sequence.
std::vector<double> direct_losses(const test::GoldenModel& g, const std::vector<int32_t>& ids) {
  State st = g.model->new_state();
  Tensor l = g.model->forward(ids.data(), SeqBatch::single(int64_t(ids.size()) - 1), st, LogitsMode::all);
  const std::vector<float> h = test::host(*g.be, l);
  const int64_t V = g.model->config().n_vocab;
  std::vector<double> out;
  for (size_t i = 0; i + 1 < ids.size(); ++i) {
    double z = 0;
    for (int64_t v = 0; v < V; ++v) z += std::exp(double(h[i * size_t(V) + size_t(v)]));
    out.push_back(std::log(z) - double(h[i * size_t(V) + size_t(ids[i + 1])]));
  }
  return out;
}

TEST(LongLossGolden, TokenLossesEqualDirectComputation) {
  for (const char* name : {"rwkvx-tiny", "rwkv7-tiny"}) {
    auto g = test::load_golden(name);
    const std::vector<int32_t> ids = test::random_tokens(90, 300, 5);
    const std::vector<double> want = direct_losses(g, ids);
    for (int64_t window : {7, 256}) {
      const std::vector<double> got = token_losses(*g.model, ids, window);
      ASSERT_EQ(got.size(), want.size());
      for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-4 * std::max(1.0, want[i])) << name << " " << i;
    }
    EXPECT_TRUE(token_losses(*g.model, {5}).empty());
    EXPECT_THROW(token_losses(*g.model, {5, 300}), Error);
  }
}

// The official script: for each S separately, the first max_docs documents with len - skip >= S, each
// scored over w = ids[skip : skip + S + 1] by its own forward.
TEST(LongLossGolden, BucketsEqualOfficialSeparateRuns) {
  auto g = test::load_golden("rwkvx-tiny");
  std::vector<std::vector<int32_t>> docs;
  const int64_t lens[] = {20, 75, 44, 60, 38, 70, 41, 33};  // skip 5: after_skip 15, 70, 39, 55, 33, 65, 36, 28
  for (size_t i = 0; i < std::size(lens); ++i) docs.push_back(test::random_tokens(lens[i], 300, 100 + i));
  LongLossConfig cfg;
  cfg.lengths = {16, 33, 64};
  cfg.skip = 5;
  cfg.max_docs = 2;
  const LongLossResult r = run_long_loss(*g.model, docs, cfg);
  const LongLossResult r2 = run_long_loss(*g.model, docs, cfg);
  ASSERT_EQ(r.buckets.size(), 3u);
  for (size_t s = 0; s < 3; ++s) {
    const int64_t S = cfg.lengths[s], lo = s == 0 ? 0 : cfg.lengths[s - 1];
    double sum = 0, sum_b = 0;
    int64_t n = 0;
    for (const auto& ids : docs) {
      if (n == cfg.max_docs) break;
      if (int64_t(ids.size()) - cfg.skip < S) continue;
      const std::vector<int32_t> w(ids.begin() + cfg.skip, ids.begin() + std::min<int64_t>(int64_t(ids.size()), cfg.skip + S + 1));
      const std::vector<double> l = direct_losses(g, w);
      double a = 0, b = 0;
      for (size_t p = 0; p < l.size(); ++p) a += l[p], b += int64_t(p) >= lo ? l[p] : 0;
      sum += a / double(l.size());
      sum_b += b / double(int64_t(l.size()) - lo);
      ++n;
    }
    EXPECT_EQ(r.buckets[s].docs, n) << "S " << S;
    EXPECT_EQ(r.buckets[s].lo, lo);
    EXPECT_EQ(r.buckets[s].hi, S);
    EXPECT_NEAR(r.buckets[s].mean_loss, sum / double(n), 1e-5) << "S " << S;
    EXPECT_NEAR(r.buckets[s].bucket_loss, sum_b / double(n), 1e-5) << "S " << S;
    EXPECT_EQ(r.buckets[s].mean_loss, r2.buckets[s].mean_loss);
  }
  // S = 64 has exactly two qualifying documents (after_skip 70 and 65); S = 16 takes the first two with >= 16.
  EXPECT_EQ(r.buckets[2].docs, 2);
  EXPECT_EQ(r.position_loss, r2.position_loss);
  ASSERT_EQ(r.position_loss.size(), 64u);
  // Runs: doc 1 (70: S = 64, serving 16 and 33 too), doc 2 (39: S = 33, serving 16), doc 5 (65: S = 64);
  // docs 0, 3, 4 and 7 are too short for every S that still needs documents.
  EXPECT_EQ(r.docs_read, 6);
  EXPECT_EQ(r.position_docs[0], 3);
  EXPECT_EQ(r.position_docs[32], 3);
  EXPECT_EQ(r.position_docs[33], 2);
  EXPECT_EQ(r.position_docs[63], 2);
}

TEST(LongLossGolden, NoQualifyingDocumentIsAnError) {
  auto g = test::load_golden("rwkv7-tiny");
  LongLossConfig cfg;
  cfg.lengths = {64};
  cfg.skip = 10;
  EXPECT_THROW(run_long_loss(*g.model, {test::random_tokens(40, 300, 1)}, cfg), Error);
  cfg.lengths = {32, 16};
  EXPECT_THROW(validate_long_loss_config(cfg), Error);
}

TEST(LongLoss, DefaultLengthsAreTheOfficialList) {
  const std::vector<int64_t> v = long_loss_default_lengths(32768);
  ASSERT_EQ(v.size(), 16u);
  EXPECT_EQ(v.front(), 2048);
  EXPECT_EQ(v[14], 30720);
  EXPECT_EQ(v.back(), 32768);
  EXPECT_EQ(long_loss_default_lengths(5000), (std::vector<int64_t>{2048, 4096, 5000}));
}

TEST(LongLoss, LoadsTextJsonlAndBinidx) {
  test::TempDir dir;
  const Tokenizer tok = test::small_tokenizer();
  const std::string txt = dir.write("a.txt", "The grass is green.");
  auto d = load_documents(txt, &tok);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0], tok.encode("The grass is green."));
  const std::string jl = dir.write("b.jsonl", "{\"text\": \"ab\"}\n\n{\"body\": \"cd\", \"text\": \"The\"}\n");
  d = load_documents(jl, &tok);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[1], tok.encode("The"));
  try {
    load_documents(jl, &tok, "body");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("b.jsonl:1:"), std::string::npos) << e.what();
  }
  const std::string bad = dir.write("c.jsonl", "{\"text\": \"ab\"}\n{\"text\": \"ab\"\n");
  try {
    load_documents(bad, &tok);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("c.jsonl:2:"), std::string::npos) << e.what();
  }
  EXPECT_THROW(load_documents(dir.file("missing.jsonl"), &tok), Error);
  EXPECT_THROW(load_documents(dir.file("missing-prefix"), &tok), Error);
  EXPECT_THROW(load_documents(dir.write("empty.jsonl", "\n"), &tok), Error);
  const std::string prefix = dir.file("ds");
  BinIdxWriter w(prefix, BinIdxDType::u16);
  w.add_document(std::vector<int32_t>{1, 2, 3});
  w.add_document(std::vector<int32_t>{7, 8});
  w.finish();
  d = load_documents(prefix, nullptr);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0], (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(d[1], (std::vector<int32_t>{7, 8}));
}

}  // namespace
}  // namespace rwkvx
