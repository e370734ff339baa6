// Sessions and generation on real models: greedy generation follows the argmax of the forward logits
// (golden and random models, in process and through `rwkvx generate` / `rwkvx logits`), seeded
// sampling is reproducible, text streams whole through the World vocabulary, state slot copies and
// snapshots continue identically, and `rwkvx chat` keeps its conversation in the state.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <sstream>

#include "model/state_copy.h"
#include "runtime/engine.h"
#include "runtime/session.h"
#include "runtime/tokenizer.h"
#include "support/random_model.h"
#include "support/run_cli.h"

namespace rwkvx {
namespace {

SamplingParams greedy() {
  SamplingParams p;
  p.temperature = 0;
  p.presence_penalty = p.frequency_penalty = 0;
  return p;
}

// Every generated token is the argmax of the full-sequence logits at the previous position.
void expect_argmax_path(const Model& m, const std::vector<int32_t>& prompt, const std::vector<int32_t>& gen) {
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), gen.begin(), gen.end());
  State st = m.new_state();
  std::vector<float> logits = test::run_pieces(m, st, all, {int64_t(all.size())});
  const size_t V = size_t(m.config().n_vocab);
  for (size_t i = 0; i < gen.size(); ++i) {
    const float* row = logits.data() + (prompt.size() - 1 + i) * V;
    EXPECT_EQ(gen[i], int32_t(std::max_element(row, row + V) - row)) << "generated token " << i;
  }
}

std::vector<int32_t> golden_tokens(const std::string& name, nlohmann::json* config = nullptr) {
  nlohmann::json c = nlohmann::json::parse(std::ifstream(test::golden_dir(name) + "/case.json"));
  if (config) *config = c["config"];
  return c["tokens"].get<std::vector<int32_t>>();
}

class GoldenGreedy : public testing::TestWithParam<const char*> {};

TEST_P(GoldenGreedy, SessionFollowsTheArgmaxPath) {
  nlohmann::json cfg;
  std::vector<int32_t> ids = golden_tokens(GetParam(), &cfg);
  ModelOptions opt;
  opt.chunk = cfg["chunk"].get<int>();
  opt.top_k = cfg["topk"].get<int>();
  auto be = make_reference_backend();
  LoadedModel lm = load_model(test::golden_dir(GetParam()) + "/model.safetensors", opt, *be);
  Session s(*lm.model, lm.fingerprint, nullptr);
  const std::vector<int32_t> prompt(ids.begin(), ids.begin() + 20);
  s.append(prompt);
  GenerationResult r = s.generate(greedy(), 30, {});
  ASSERT_EQ(r.tokens.size(), 30u);
  EXPECT_EQ(r.reason, FinishReason::length);
  expect_argmax_path(*lm.model, prompt, r.tokens);
}

// The wording: `rwkvx generate` greedy equals the argmax path of `rwkvx logits`.
TEST_P(GoldenGreedy, CliGenerateFollowsCliLogits) {
  nlohmann::json cfg;
  std::vector<int32_t> ids = golden_tokens(GetParam(), &cfg);
  test::TempDir dir;
  const std::string model = test::golden_dir(GetParam()) + "/model.pth";
  const std::string chunk = std::to_string(cfg["chunk"].get<int>()), topk = std::to_string(cfg["topk"].get<int>());
  std::string prompt_text;
  for (int i = 0; i < 24; ++i) prompt_text += std::to_string(ids[size_t(i)]) + " ";
  test::CliResult g = test::run_rwkvx(
      dir, {"generate", "--model", model, "--chunk-size", chunk, "--top-k", topk, "--prompt-tokens",
            dir.write("prompt.txt", prompt_text), "--temperature", "0", "--presence-penalty", "0",
            "--frequency-penalty", "0", "--max-tokens", "24", "--print-tokens"});
  ASSERT_EQ(g.status, 0) << g.stderr_text;
  std::vector<int32_t> gen;
  std::istringstream in(g.stdout_text);
  for (int32_t x; in >> x;) gen.push_back(x);
  ASSERT_EQ(gen.size(), 24u) << g.stdout_text;
  std::string all_text = prompt_text;
  for (int32_t x : gen) all_text += std::to_string(x) + " ";
  test::CliResult l = test::run_rwkvx(dir, {"logits", "--model", model, "--chunk-size", chunk, "--top-k", topk,
                                            "--tokens-file", dir.write("all.txt", all_text), "--out",
                                            dir.file("logits.f32")});
  ASSERT_EQ(l.status, 0) << l.stderr_text;
  std::vector<float> logits = test::read_f32_file(dir.file("logits.f32"));
  const size_t V = 300;
  ASSERT_EQ(logits.size(), 48 * V);
  for (size_t i = 0; i < gen.size(); ++i) {
    const float* row = logits.data() + (23 + i) * V;
    EXPECT_EQ(gen[i], int32_t(std::max_element(row, row + V) - row)) << "generated token " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, GoldenGreedy, testing::Values("rwkv7-tiny", "rwkvx-tiny"),
                         [](const auto& i) { return std::string(i.param) == "rwkv7-tiny" ? "rwkv7" : "rwkvx"; });

struct RandomCase {
  const char* label;
  RandomModelSpec spec;
};

std::vector<RandomCase> random_cases() {
  RandomModelSpec r7, rx;
  r7.n_embd = 64, r7.n_rwkv = 2, r7.seed = 41;
  rx.n_embd = 128, rx.n_rwkv = 2, rx.n_sparse = 2, rx.seed = 42;
  return {{"rwkv7", r7}, {"rwkvx", rx}};
}

class RandomSession : public testing::TestWithParam<RandomCase> {
 protected:
  std::unique_ptr<Model> load(const ModelOptions& opt) { return test::load_random_model(GetParam().spec, opt, *be); }
  ModelOptions small_chunks() {
    ModelOptions o;
    o.chunk = 8;
    o.top_k = 3;
    return o;
  }
  std::unique_ptr<Backend> be = make_reference_backend();
};

TEST_P(RandomSession, GreedyFollowsTheArgmaxPathAcrossChunks) {
  auto m = load(small_chunks());
  Session s(*m, "", nullptr);
  const std::vector<int32_t> prompt = test::random_tokens(13, GetParam().spec.n_vocab, 5);
  s.append(prompt);
  GenerationResult r = s.generate(greedy(), 30, {});
  expect_argmax_path(*m, prompt, r.tokens);
}

TEST_P(RandomSession, SeededSamplingIsReproducible) {
  auto m = load(small_chunks());
  const std::vector<int32_t> prompt = test::random_tokens(9, GetParam().spec.n_vocab, 6);
  auto run = [&](uint64_t seed) {
    Session s(*m, "", nullptr);
    s.append(prompt);
    SamplingParams p;
    p.seed = seed;
    p.temperature = 1.5f;  // flat enough that two seeds part ways
    p.top_p = 1;
    return s.generate(p, 25, {}).tokens;
  };
  const std::vector<int32_t> a = run(7);
  EXPECT_EQ(a, run(7));
  EXPECT_NE(a, run(8));
}

TEST_P(RandomSession, CopiedSlotsAndSnapshotsContinueIdentically) {
  auto m = load(small_chunks());
  const std::vector<int32_t> prompt = test::random_tokens(21, GetParam().spec.n_vocab, 8);
  State batch = m->new_state(3), single = m->new_state(1);
  test::run_pieces(*m, single, prompt, {21});
  copy_state_slot(*be, single, 0, batch, 2);
  const std::vector<int32_t> more = test::random_tokens(11, GetParam().spec.n_vocab, 9);
  std::vector<float> a = test::run_pieces(*m, single, more, {11});
  Tensor l = m->forward(more.data(), SeqBatch::single(11, 2), batch, LogitsMode::all);
  EXPECT_EQ(a, test::host(*be, l));
  State back = m->new_state(1);
  copy_state_slot(*be, batch, 2, back, 0);
  EXPECT_EQ(test::state_diff(*be, back, single), 0.0);

  Session s(*m, "", nullptr);
  s.append(prompt);
  s.prefill();
  auto snap = s.snapshot();
  SamplingParams p;
  p.seed = 3;
  const std::vector<int32_t> first = s.generate(p, 12, {}).tokens;
  s.restore(*snap);
  EXPECT_EQ(s.generate(p, 12, {}).tokens, first);
}

INSTANTIATE_TEST_SUITE_P(Random, RandomSession, testing::ValuesIn(random_cases()),
                         [](const auto& i) { return std::string(i.param.label); });

// A model with the real World vocabulary (65536 rows) but tiny width, so text round-trips.
RandomModelSpec world_vocab_spec() {
  RandomModelSpec s;
  s.n_vocab = 65536, s.n_embd = 64, s.n_rwkv = 2, s.n_sparse = 1, s.seed = 43;
  return s;
}

TEST(SessionText, StreamedPiecesAreTheGeneratedText) {
  auto be = make_reference_backend();
  Tokenizer tok = Tokenizer::load(default_vocab_path());
  ModelOptions opt;
  opt.chunk = 16;
  auto m = test::load_random_model(world_vocab_spec(), opt, *be);
  Session s(*m, "", &tok);
  s.append(tok.encode("The quick brown fox"));
  SamplingParams p;
  p.seed = 11;
  p.ban_tokens.resize(256);  // no raw bytes: every token is whole UTF-8, so all text gets emitted
  for (int i = 0; i < 256; ++i) p.ban_tokens[size_t(i)] = i + 1;
  std::string streamed;
  GenerationResult r = s.generate(p, 20, [&](const std::string& t) { streamed += t; });
  EXPECT_EQ(streamed, r.text);
  EXPECT_EQ(r.tokens.size(), 20u);
  EXPECT_FALSE(r.text.empty());
  EXPECT_TRUE(is_valid_utf8(r.text));
  EXPECT_EQ(tok.decode_bytes(r.tokens), r.text);
  EXPECT_EQ(s.tokens().size(), 4 + 20u);
  EXPECT_EQ(s.n_pending(), 1);  // the last token is fed only when the session continues
}

TEST(SessionText, EmptyPromptIsAClearError) {
  auto be = make_reference_backend();
  auto m = test::load_random_model(RandomModelSpec{}, ModelOptions{}, *be);
  Session s(*m, "", nullptr);
  try {
    s.generate(SamplingParams{}, 5, {});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("prompt is empty"), std::string::npos) << e.what();
  }
  const std::vector<int32_t> bad = {300};
  EXPECT_THROW(s.append(bad), Error);
}

TEST(GenerateCli, StreamsTextAndRejectsBadArguments) {
  test::TempDir dir;
  const std::string model = test::write_random_model(dir, "world.safetensors", world_vocab_spec());
  test::CliResult ok = test::run_rwkvx(dir, {"generate", "--model", model, "--chunk-size", "16", "--prompt", "Hi",
                                             "--max-tokens", "5", "--seed", "4", "--stop", "zzz"});
  EXPECT_EQ(ok.status, 0) << ok.stderr_text;
  EXPECT_EQ(ok.stderr_text, "");  // no progress or summary when stderr is not a terminal
  EXPECT_TRUE(is_valid_utf8(ok.stdout_text));
  // --device cuda runs on the GPU, or on the CPU with a one-line notice when there is none (or no CUDA build).
  test::CliResult gpu = test::run_rwkvx(dir, {"generate", "--model", model, "--chunk-size", "16", "--prompt", "Hi",
                                              "--max-tokens", "3", "--seed", "4", "--device", "cuda"});
  EXPECT_EQ(gpu.status, 0) << gpu.stderr_text;
  if (!gpu.stderr_text.empty()) {
    EXPECT_NE(gpu.stderr_text.find("running on the CPU backend instead"), std::string::npos) << gpu.stderr_text;
  }
  struct Bad {
    std::vector<std::string> args;
    const char* message;
  };
  const std::vector<Bad> bad = {
      {{"--device", "tpu", "--prompt", "x"}, "unknown device 'tpu'"},
      {{"--prompt", "x", "--prompt-file", model}, "only one of --prompt"},
      {{}, "nothing to continue"},
      {{"--prompt", "x", "--temperature", "-1"}, "temperature must be"},
      {{"--prompt", "x", "--ban", "70000"}, "banned token id 70000"},
      {{"--prompt-file", dir.file("missing.txt")}, "missing.txt: cannot open"},
  };
  for (const Bad& b : bad) {
    std::vector<std::string> args = {"generate", "--model", model, "--max-tokens", "2"};
    args.insert(args.end(), b.args.begin(), b.args.end());
    test::CliResult r = test::run_rwkvx(dir, args);
    EXPECT_EQ(r.status, 1) << b.message;
    EXPECT_NE(r.stderr_text.find(b.message), std::string::npos) << r.stderr_text;
    EXPECT_EQ(r.stderr_text.rfind("error: ", 0), 0u) << r.stderr_text;
  }
}

TEST(ChatCli, ConversationLivesInTheStateAndSurvivesSaveLoad) {
  test::TempDir dir;
  const std::string model = test::write_random_model(dir, "world.safetensors", world_vocab_spec());
  const std::string state = dir.file("chat.state");
  const std::string script = dir.write(
      "in1.txt", "/set max_tokens 6\n/set seed 5\nHello there\nHow are you?\n/save " + state + "\n/bogus\n/quit\n");
  test::CliResult r = test::run_rwkvx(dir, {"chat", "--model", model, "--chunk-size", "16"}, script);
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  size_t replies = 0;
  for (size_t p = 0; (p = r.stdout_text.find("Assistant:", p)) != std::string::npos; ++p) ++replies;
  EXPECT_EQ(replies, 2u) << r.stdout_text;
  EXPECT_NE(r.stdout_text.find("(saved"), std::string::npos) << r.stdout_text;
  EXPECT_NE(r.stderr_text.find("unknown command '/bogus'"), std::string::npos) << r.stderr_text;

  // The saved conversation holds both turns in the World format and continues after /load.
  auto be = make_reference_backend();
  Tokenizer tok = Tokenizer::load(default_vocab_path());
  ModelOptions opt;
  opt.chunk = 16;
  LoadedModel lm = load_model(model, opt, *be);
  Session s(*lm.model, lm.fingerprint, &tok);
  s.load(state);
  const std::string history = tok.decode_bytes(s.tokens());
  EXPECT_EQ(history.rfind("User: Hello there\n\nAssistant:", 0), 0u) << history;
  EXPECT_NE(history.find("\n\nUser: How are you?\n\nAssistant:"), std::string::npos) << history;
  EXPECT_EQ(history.substr(history.size() - 2), "\n\n");

  const std::string script2 = dir.write("in2.txt", "/load " + state + "\n/set max_tokens 3\nAnd now?\n");
  test::CliResult r2 = test::run_rwkvx(dir, {"chat", "--model", model, "--chunk-size", "16"}, script2);
  ASSERT_EQ(r2.status, 0) << r2.stderr_text;
  EXPECT_NE(r2.stdout_text.find("(loaded"), std::string::npos) << r2.stdout_text;
  EXPECT_NE(r2.stdout_text.find("Assistant:"), std::string::npos) << r2.stdout_text;
  EXPECT_EQ(r2.stderr_text, "");
}

}  // namespace
}  // namespace rwkvx
