// Sampling (spec system.md §2): every option against a hand-computed distribution on a tiny logits
// vector, penalties with decay and the weight-0 rule, seeded reproducibility and empirical
// frequencies, plus the streaming pieces of generation (UTF-8-safe detokenizer, stop strings).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "core/error.h"
#include "runtime/generation.h"
#include "runtime/sampler.h"
#include "runtime/tokenizer.h"

namespace rwkvx {
namespace {

// logits [1, 2, 3, 0]: softmax = e^l / Σ e^l.
const std::vector<float> kLogits = {1, 2, 3, 0};

std::vector<double> softmax(const std::vector<double>& l, const std::vector<int>& keep) {
  std::vector<double> p(l.size(), 0.0);
  double s = 0;
  for (int i : keep) s += std::exp(l[size_t(i)]);
  for (int i : keep) p[size_t(i)] = std::exp(l[size_t(i)]) / s;
  return p;
}

void expect_dist(const std::vector<float>& got, const std::vector<double>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 2e-7) << what << " at id " << i;
}

std::vector<float> dist(SamplingParams p, const std::vector<float>& logits = kLogits) {
  Sampler s(p, int64_t(logits.size()));
  return s.distribution(logits);
}

SamplingParams plain() {
  SamplingParams p;
  p.top_p = 1.0f;
  p.presence_penalty = p.frequency_penalty = 0;
  return p;
}

TEST(Sampler, SoftmaxWhenEverythingIsOff) {
  expect_dist(dist(plain()), softmax({1, 2, 3, 0}, {0, 1, 2, 3}), "plain");
}

TEST(Sampler, TemperatureZeroIsGreedy) {
  SamplingParams p = plain();
  p.temperature = 0;
  expect_dist(dist(p), {0, 0, 1, 0}, "greedy");
}

TEST(Sampler, TopPKeepsTheSmallestPrefixReachingTheMass) {
  // p ≈ [0.0871, 0.2369, 0.6439, 0.0321]; sorted cumsum 0.6439, 0.8808, 0.9679, 1.
  SamplingParams p = plain();
  p.top_p = 0.7f;  // reached at the 2nd entry: ids 2 and 1 survive
  expect_dist(dist(p), softmax({1, 2, 3, 0}, {1, 2}), "top_p 0.7");
  p.top_p = 0.5f;  // the first entry alone reaches it
  expect_dist(dist(p), {0, 0, 1, 0}, "top_p 0.5");
  p.top_p = 0.95f;
  expect_dist(dist(p), softmax({1, 2, 3, 0}, {0, 1, 2}), "top_p 0.95");
  p.top_p = 0.0f;
  expect_dist(dist(p), {0, 0, 1, 0}, "top_p 0");
}

TEST(Sampler, TopPKeepsTiesWithTheCutoff) {
  SamplingParams p = plain();
  p.top_p = 0.3f;
  // Two equal maxima: the cutoff is their probability and both survive.
  expect_dist(dist(p, {2, 2, 0, 1}), softmax({2, 2, 0, 1}, {0, 1}), "tie");
}

TEST(Sampler, TopKKeepsTheKMostLikely) {
  SamplingParams p = plain();
  p.top_k = 2;
  expect_dist(dist(p), softmax({1, 2, 3, 0}, {1, 2}), "top_k 2");
  p.top_k = 1;
  expect_dist(dist(p), {0, 0, 1, 0}, "top_k 1");
  p.top_k = 4;  // top_k >= V is off
  expect_dist(dist(p), softmax({1, 2, 3, 0}, {0, 1, 2, 3}), "top_k 4");
  p.top_k = 2;  // ties broken towards the lower id
  expect_dist(dist(p, {1, 1, 1, 0}), softmax({1, 1, 1, 0}, {0, 1}), "top_k tie");
}

TEST(Sampler, TopKAndTopPIntersect) {
  SamplingParams p = plain();
  p.top_k = 3;
  p.top_p = 0.7f;
  expect_dist(dist(p), softmax({1, 2, 3, 0}, {1, 2}), "top_k 3 + top_p 0.7");
  p.top_k = 1;
  p.top_p = 0.95f;
  expect_dist(dist(p), {0, 0, 1, 0}, "top_k 1 + top_p 0.95");
}

TEST(Sampler, TemperatureAppliesAfterTruncation) {
  SamplingParams p = plain();
  p.temperature = 2;  // p^(1/2) renormalised = softmax(l / 2)
  expect_dist(dist(p), softmax({0.5, 1, 1.5, 0}, {0, 1, 2, 3}), "T=2");
  // top_p decides on the untempered p (keeps ids 0, 1, 2), then T = 0.5 sharpens the survivors.
  p.temperature = 0.5f;
  p.top_p = 0.95f;
  expect_dist(dist(p), softmax({2, 4, 6, 0}, {0, 1, 2}), "T=0.5 after top_p 0.95");
  // A tiny temperature neither underflows nor loses the maximum.
  p.temperature = 1e-4f;
  p.top_p = 1;
  expect_dist(dist(p), {0, 0, 1, 0}, "T=1e-4");
}

TEST(Sampler, TopPOneIsOffNativelyButKeepsTheQuirkInCompatMode) {
  // Chosen so that the float32 cumulative sum of the sorted probabilities ends at 0.99999994 < 1.
  const std::vector<float> l = {-1.5f, 3.4f, -1.5f, -1.2f, -0.2f};
  SamplingParams p = plain();
  expect_dist(dist(p, l), softmax({-1.5, 3.4, -1.5, -1.2, -0.2}, {0, 1, 2, 3, 4}), "native top_p 1");
  p.compat_top_p = true;
  expect_dist(dist(p, l), {0, 1, 0, 0, 0}, "compat top_p 1");
}

TEST(Sampler, BansAndPenaltiesWithDecay) {
  SamplingParams p = plain();
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.25f;
  p.penalty_decay = 0.5f;
  p.ban_tokens = {3};
  Sampler s(p, 4);
  s.accept(1);  // {1: 1}
  s.accept(1);  // decay then add: {1: 1.5}
  s.accept(2);  // {1: 0.75, 2: 1}
  std::vector<float> l = kLogits;
  s.apply_penalties(l);
  EXPECT_FLOAT_EQ(l[0], 1.0f);
  EXPECT_FLOAT_EQ(l[1], 2.0f - (0.5f + 0.75f * 0.25f));
  EXPECT_FLOAT_EQ(l[2], 3.0f - (0.5f + 1.0f * 0.25f));
  EXPECT_EQ(l[3], -std::numeric_limits<float>::infinity());
  expect_dist(s.distribution(l), softmax({1, 2 - 0.6875, 3 - 0.75, 0}, {0, 1, 2}), "penalised");
}

TEST(Sampler, EverythingBannedIsAnError) {
  SamplingParams p = plain();
  p.ban_tokens = {0, 1, 2, 3};
  Sampler s(p, 4);
  EXPECT_THROW(s.sample(kLogits), Error);
}

TEST(Sampler, WeightZeroTokensAreTheSubstringsOfSpaceTabDigits) {
  Tokenizer tok = Tokenizer::load(default_vocab_path());
  const std::vector<uint8_t> w = penalty_weights(tok, 65536);
  std::vector<int> zero;
  for (size_t i = 0; i < w.size(); ++i)
    if (!w[i]) zero.push_back(int(i));
  // spec §2.1: \t, ' ', ' \t', '0'..'9', '01' '12' ... '89'.
  std::vector<int> want = {10, 33};
  for (int d = 49; d <= 58; ++d) want.push_back(d);
  want.push_back(264);
  for (int id = 621; id <= 709; id += 11) want.push_back(id);
  std::sort(want.begin(), want.end());
  EXPECT_EQ(zero, want);

  // A weight-0 token still gets the presence penalty, but no frequency count.
  SamplingParams p = plain();
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 1.0f;
  Sampler s(p, 65536, std::make_shared<const std::vector<uint8_t>>(w));
  s.accept(33);
  s.accept(33);
  s.accept(34);
  std::vector<float> l(65536, 0.0f);
  s.apply_penalties(l);
  EXPECT_FLOAT_EQ(l[33], -0.5f);
  EXPECT_FLOAT_EQ(l[34], -1.5f);
  EXPECT_FLOAT_EQ(l[35], 0.0f);
}

TEST(Sampler, SeededDrawsAreReproducibleAndFollowTheDistribution) {
  SamplingParams p = plain();
  p.top_p = 0.95f;  // ids 0, 1, 2
  p.seed = 1234;
  Sampler a(p, 4), b(p, 4);
  p.seed = 99;
  Sampler c(p, 4);
  std::vector<int> counts(4, 0);
  int differ = 0;
  const int n = 40000;
  for (int i = 0; i < n; ++i) {
    const int32_t x = a.sample(kLogits);
    EXPECT_EQ(x, b.sample(kLogits));
    differ += x != c.sample(kLogits);
    ++counts[size_t(x)];
  }
  EXPECT_GT(differ, n / 4);
  const std::vector<double> want = softmax({1, 2, 3, 0}, {0, 1, 2});
  for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(double(counts[i]) / n, want[i], 0.01) << "id " << i;
  EXPECT_EQ(counts[3], 0);
}

TEST(Sampler, ValidateNamesTheBadField) {
  auto msg = [](auto edit) {
    SamplingParams p;
    edit(p);
    try {
      p.validate(10);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(msg([](SamplingParams& p) { p.temperature = -1; }).find("temperature"), std::string::npos);
  EXPECT_NE(msg([](SamplingParams& p) { p.top_p = 1.5f; }).find("top_p"), std::string::npos);
  EXPECT_NE(msg([](SamplingParams& p) { p.top_k = -1; }).find("top_k"), std::string::npos);
  EXPECT_NE(msg([](SamplingParams& p) { p.penalty_decay = 2; }).find("penalty_decay"), std::string::npos);
  EXPECT_NE(msg([](SamplingParams& p) { p.presence_penalty = NAN; }).find("presence_penalty"), std::string::npos);
  EXPECT_NE(msg([](SamplingParams& p) { p.ban_tokens = {10}; }).find("banned token id 10"), std::string::npos);
  EXPECT_NE(msg([](SamplingParams& p) { p.stop_tokens = {-1}; }).find("stop token id -1"), std::string::npos);
  EXPECT_NE(msg([](SamplingParams& p) { p.stop_strings = {""}; }).find("stop strings"), std::string::npos);
  EXPECT_EQ(msg([](SamplingParams&) {}), "");
}

TEST(Generation, StopTokenIsNeitherEmittedNorAccepted) {
  SamplingParams p = plain();
  p.temperature = 0;
  p.stop_tokens = {2};
  Generation g(p, 10, 4, nullptr, nullptr);
  GenerationStep st = g.step(kLogits);
  EXPECT_EQ(st.token, 2);
  EXPECT_FALSE(st.accepted);
  EXPECT_TRUE(g.finished());
  EXPECT_EQ(g.reason(), FinishReason::stop_token);
  EXPECT_TRUE(g.tokens().empty());
}

TEST(Generation, MaxTokensEndsWithLength) {
  SamplingParams p = plain();
  p.temperature = 0;
  Generation g(p, 3, 4, nullptr, nullptr);
  for (int i = 0; i < 3; ++i) {
    ASSERT_FALSE(g.finished());
    EXPECT_TRUE(g.step(kLogits).accepted);
  }
  EXPECT_EQ(g.reason(), FinishReason::length);
  EXPECT_EQ(g.tokens(), (std::vector<int32_t>{2, 2, 2}));
  Generation none(p, 0, 4, nullptr, nullptr);
  EXPECT_TRUE(none.finished());
}

TEST(TextStreamer, EmitsMultiTokenCharactersWhole) {
  Tokenizer tok = Tokenizer::load(default_vocab_path());
  TextStreamer s(&tok);
  // "é" = C3 A9 as two single-byte tokens (id = byte + 1).
  EXPECT_EQ(s.push(0xC3 + 1), "");
  EXPECT_EQ(s.push(0xA9 + 1), "\xC3\xA9");
  EXPECT_EQ(s.push(33155), "Hello");
  TextStreamer none(nullptr);
  EXPECT_EQ(none.push(33155), "");
}

TEST(StopStringMatcher, HoldsBackPossibleStartsAndCutsAtTheStop) {
  StopStringMatcher m({"User:", "\n\n"});
  EXPECT_EQ(m.push("Hello"), "Hello");
  EXPECT_EQ(m.push(" Us"), " ");  // "Us" may start "User:"
  EXPECT_EQ(m.push("eful"), "Useful");
  EXPECT_EQ(m.push(" tip\n"), " tip");
  EXPECT_EQ(m.push("\nUser: more"), "");  // "\n\n" comes first
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(m.push("anything"), "");
  EXPECT_EQ(m.flush(), "");

  StopStringMatcher n({"User:"});
  EXPECT_EQ(n.push("a U"), "a ");
  EXPECT_EQ(n.push("se"), "");
  EXPECT_EQ(n.flush(), "Use");  // generation ended without the stop: the held text is released
  StopStringMatcher split({"User:"});
  EXPECT_EQ(split.push("ok User"), "ok ");
  EXPECT_EQ(split.push(": hi"), "");
  EXPECT_TRUE(split.stopped());
}

}  // namespace
}  // namespace rwkvx
