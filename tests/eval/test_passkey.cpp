// Passkey protocol (spec system.md §5.1): keys, filler, prompt, scoring on hand-made strings, and the
// eval on the golden RWKV-X model (deterministic; prefix sharing and decode equal full forwards).
#include <gtest/gtest.h>

#include <algorithm>

#include "eval/eval_test_util.h"
#include "eval/passkey.h"

namespace rwkvx {
namespace {

TEST(Passkey, KeysMatchNumpyLegacyRandint) {
  const int expected[] = {2733, 33004, 23721, 5995, 17531};
  for (uint32_t k = 0; k < 5; ++k) EXPECT_EQ(passkey_key(k), expected[k]) << "seed " << k;
  for (uint32_t k = 0; k < 200; ++k) {
    const int key = passkey_key(k);
    EXPECT_GE(key, 1);
    EXPECT_LE(key, 49999);
  }
}

TEST(Passkey, FillerLengthsAndSweep) {
  EXPECT_EQ(passkey_filler_chars(2000), 7000);
  EXPECT_EQ(passkey_filler_chars(4000), 15000);
  EXPECT_EQ(passkey_filler_chars(16000), 60000);
  EXPECT_EQ(passkey_filler_chars(64000), 240000);
  EXPECT_EQ(passkey_filler_chars(267), 1000);
  EXPECT_EQ(passkey_filler_chars(266), 0);
  const std::vector<int64_t> L = passkey_official_lengths(64000);
  ASSERT_EQ(L.size(), 32u);
  EXPECT_EQ(L.front(), 2000);
  EXPECT_EQ(L.back(), 64000);
  const std::vector<double> D = passkey_official_depths();
  ASSERT_EQ(D.size(), 10u);
  EXPECT_EQ(D[9], 0.9);
}

TEST(Passkey, FillerIsTheOfficialRepetition) {
  const std::string unit = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
  const std::string g = passkey_filler(3 * unit.size() + 10);
  EXPECT_EQ(g.size(), 3 * unit.size() + 10);
  EXPECT_EQ(g.substr(0, unit.size() + 1), unit + " ");
  EXPECT_EQ(g.substr(unit.size() + 1, unit.size()), unit);
  EXPECT_EQ(passkey_filler(5), "The g");
  EXPECT_EQ(passkey_filler(0), "");
}

TEST(Passkey, PromptTemplate) {
  const std::string p = passkey_prompt(1000, 0, 2733);
  const std::string g = passkey_filler(1000);
  EXPECT_EQ(p,
            "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will "
            "quiz you about the important information there.\n\nThe pass key is 2733. Remember it. 2733 is the pass "
            "key.\n" + g + "\nWhat is the pass key? The pass key is");
  // Both filler pieces are cut from the start of G.
  const std::string q = passkey_prompt(1000, 300, 5995);
  EXPECT_NE(q.find("there.\n" + g.substr(0, 300) + "\nThe pass key is 5995. Remember it. 5995 is the pass key.\n" +
                   g.substr(0, 700) + "\nWhat is"),
            std::string::npos);
  EXPECT_THROW(passkey_prompt(1000, 1001, 1), Error);
  EXPECT_THROW(passkey_prompt(1000, -1, 1), Error);
}

TEST(Passkey, ExactMatchScoring) {
  EXPECT_TRUE(passkey_correct("2733", 2733));
  EXPECT_TRUE(passkey_correct(" 2733", 2733));
  EXPECT_TRUE(passkey_correct("\n2733\t ", 2733));
  EXPECT_TRUE(passkey_correct("\xC2\xA0" "2733\xE3\x80\x80", 2733));  // NBSP and ideographic space strip too
  EXPECT_FALSE(passkey_correct(" 27330", 2733));
  EXPECT_FALSE(passkey_correct(" 273", 2733));
  EXPECT_FALSE(passkey_correct("2733.", 2733));
  EXPECT_FALSE(passkey_correct("2 733", 2733));
  EXPECT_FALSE(passkey_correct("\xEF\xBF\xBD", 2733));
  EXPECT_EQ(strip_whitespace("  a b \n"), "a b");
  EXPECT_EQ(strip_whitespace(" \t "), "");
  // Scoring through the tokenizer, as run_passkey does: decode the generated ids, then compare.
  const Tokenizer tok = test::small_tokenizer();
  EXPECT_TRUE(passkey_correct(tok.decode_compat(tok.encode(" 17531")), 17531));
  EXPECT_FALSE(passkey_correct(tok.decode_compat(tok.encode(" 1753")), 17531));
}

TEST(Passkey, BadConfigurationsAreErrors) {
  PasskeyConfig c;
  c.lengths = {1000};
  c.depths = {0.5};
  EXPECT_NO_THROW(validate_passkey_config(c));
  c.lengths = {100};
  EXPECT_THROW(validate_passkey_config(c), Error);
  c.lengths = {1000};
  c.depths = {1.5};
  EXPECT_THROW(validate_passkey_config(c), Error);
  c.depths = {};
  EXPECT_THROW(validate_passkey_config(c), Error);
  c.depths = {0};
  c.trials = 0;
  EXPECT_THROW(validate_passkey_config(c), Error);
}

// Greedy decode through the engine (prefill + single-token steps) equals argmax over one full forward
// of prompt + generated tokens (the official path re-runs the whole sequence at every step).
TEST(PasskeyGolden, GreedyDecodeEqualsFullForward) {
  auto g = test::load_golden("rwkvx-tiny");
  const Tokenizer tok = test::small_tokenizer();
  const std::vector<int32_t> prompt = tok.encode(passkey_prompt(1000, 400, 2733));
  const std::vector<int32_t> out = greedy_continue(*g.model, prompt, 4);
  ASSERT_EQ(out.size(), 4u);
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), out.begin(), out.end() - 1);
  State st = g.model->new_state();
  Tensor l = g.model->forward(all.data(), SeqBatch::single(int64_t(all.size())), st, LogitsMode::all);
  const std::vector<float> logits = test::host(*g.be, l);
  const int64_t V = g.model->config().n_vocab;
  for (size_t i = 0; i < out.size(); ++i) {
    const float* row = logits.data() + (prompt.size() - 1 + i) * size_t(V);
    EXPECT_EQ(out[i], int32_t(std::max_element(row, row + V) - row)) << "step " << i;
  }
}

TEST(PasskeyGolden, DeterministicAndSharedPrefillEqualsSeparateRuns) {
  auto g = test::load_golden("rwkvx-tiny");
  const Tokenizer tok = test::small_tokenizer();
  PasskeyConfig cfg;
  cfg.lengths = {300, 600};
  cfg.depths = {0, 0.5, 1};
  cfg.trials = 2;
  int calls = 0;
  const auto a = run_passkey(*g.model, tok, cfg, [&](const PasskeyCell&) { ++calls; });
  const auto b = run_passkey(*g.model, tok, cfg);
  EXPECT_EQ(calls, 6);
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), 6u);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].length_label, cfg.lengths[i / 3]);
    EXPECT_EQ(a[i].depth, cfg.depths[i % 3]);
    EXPECT_EQ(a[i].depth_chars, int64_t(cfg.depths[i % 3] * double(a[i].filler_chars)));
    EXPECT_EQ(a[i].score, b[i].score);
    ASSERT_EQ(a[i].trials.size(), 2u);
    int correct = 0;
    for (size_t t = 0; t < 2; ++t) {
      const PasskeyTrial& tr = a[i].trials[t];
      EXPECT_EQ(tr.output, b[i].trials[t].output);
      EXPECT_EQ(tr.key, passkey_key(uint32_t(t)));
      // Exactly len(encode(str(K))) tokens are generated.
      EXPECT_EQ(tr.output.size(), tok.encode(std::to_string(tr.key)).size());
      // The shared-prefix prefill gives what a separate run of the whole prompt gives.
      const std::vector<int32_t> prompt = tok.encode(passkey_prompt(a[i].filler_chars, a[i].depth_chars, tr.key));
      EXPECT_EQ(tr.prompt_tokens, int64_t(prompt.size()));
      EXPECT_EQ(tr.output, greedy_continue(*g.model, prompt, int(tr.output.size())));
      EXPECT_EQ(tr.decoded, tok.decode_compat(tr.output));
      EXPECT_EQ(tr.correct, passkey_correct(tr.decoded, tr.key));
      correct += tr.correct;
    }
    EXPECT_EQ(a[i].score, 100.0 * correct / 2);
  }
}

TEST(PasskeyGolden, TokensOutsideTheVocabularyAreAnError) {
  auto g = test::load_golden("rwkv7-tiny");
  // The World vocabulary encodes the prompt with ids far above the golden model's 300.
  const Tokenizer world = Tokenizer::load(default_vocab_path());
  PasskeyConfig cfg;
  cfg.lengths = {300};
  cfg.depths = {0};
  cfg.trials = 1;
  EXPECT_THROW(run_passkey(*g.model, world, cfg), Error);
}

}  // namespace
}  // namespace rwkvx
