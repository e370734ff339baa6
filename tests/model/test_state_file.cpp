// State files (src/runtime/state_file.h): save → load → continue equals continuing without the round
// trip, for RWKV-7 and RWKV-X, past the KV-cache eviction limit with eviction on and with it off; and
// every kind of bad file (truncated anywhere, corrupted, another model, other options, another
// version, not a state file) is refused with a message naming the file and the problem, leaving the
// session as it was.
#include <gtest/gtest.h>

#include <fstream>

#include "runtime/engine.h"
#include "runtime/session.h"
#include "support/random_model.h"
#include "support/run_cli.h"

namespace rwkvx {
namespace {

struct RoundTripCase {
  const char* label;
  RandomModelSpec spec;
  KvEvictionParams eviction;
  DType kv = DType::f32;
};

std::vector<RoundTripCase> cases() {
  RandomModelSpec r7, rx;
  r7.n_embd = 64, r7.n_rwkv = 3, r7.seed = 51;
  rx.n_embd = 128, rx.n_rwkv = 2, rx.n_sparse = 2, rx.seed = 52;
  const KvEvictionParams off{}, on{40, 8, 32};  // max, window, keep
  return {{"rwkv7", r7, off}, {"rwkvx_exact", rx, off}, {"rwkvx_evicting", rx, on}, {"rwkvx_kv_bf16", rx, off, DType::bf16}};
}

LoadedModel load(const RoundTripCase& c, Backend& be, int chunk = 8) {
  ModelOptions opt;
  opt.chunk = chunk;
  opt.top_k = 3;
  opt.eviction = c.eviction;
  opt.kv_dtype = c.kv;
  auto file = MappedFile::from_bytes("random.safetensors", serialize_safetensors(make_random_model(c.spec)));
  return load_model(parse_safetensors(file), opt, be);
}

SamplingParams sampling(uint64_t seed) {
  SamplingParams p;
  p.seed = seed;
  p.top_p = 0.9f;
  return p;
}

class StateRoundTrip : public testing::TestWithParam<RoundTripCase> {};

TEST_P(StateRoundTrip, LoadThenContinueEqualsContinuing) {
  const RoundTripCase& c = GetParam();
  auto be = make_reference_backend();
  LoadedModel lm = load(c, *be);
  test::TempDir dir;
  const std::vector<int32_t> prompt = test::random_tokens(30, c.spec.n_vocab, 4);

  // 30 prompt + 20 generated = 50 tokens: past the eviction limit of 40 when eviction is on.
  Session a(*lm.model, lm.fingerprint, nullptr);
  a.append(prompt);
  a.generate(sampling(1), 20, {});
  for (const auto& caches : a.state().kv) {
    const KvCache& kv = caches[0];
    if (c.eviction.max_len) {
      EXPECT_LT(kv.len, a.state().pos[0]) << "eviction should have run";
      EXPECT_LE(kv.len, c.eviction.max_len + 1);
    } else {
      EXPECT_EQ(kv.len, a.state().pos[0]);
    }
  }
  const std::string path = dir.file("mid.state");
  a.save(path);

  Session b(*lm.model, lm.fingerprint, nullptr);
  b.load(path);
  EXPECT_EQ(b.tokens(), a.tokens());
  EXPECT_EQ(b.n_pending(), a.n_pending());
  EXPECT_EQ(test::state_diff(*be, b.state(), a.state()), 0.0);

  // Continue both past another eviction (80 tokens in all), with more input in between.
  const std::vector<int32_t> more = test::random_tokens(7, c.spec.n_vocab, 5);
  GenerationResult ra1 = a.generate(sampling(2), 12, {});
  GenerationResult rb1 = b.generate(sampling(2), 12, {});
  EXPECT_EQ(rb1.tokens, ra1.tokens);
  a.append(more);
  b.append(more);
  EXPECT_EQ(b.generate(sampling(3), 11, {}).tokens, a.generate(sampling(3), 11, {}).tokens);
  a.prefill();
  b.prefill();
  EXPECT_EQ(b.last_logits(), a.last_logits());
  EXPECT_EQ(test::state_diff(*be, b.state(), a.state()), 0.0);
}

TEST_P(StateRoundTrip, StateWithoutPendingTokensKeepsItsLogits) {
  const RoundTripCase& c = GetParam();
  auto be = make_reference_backend();
  LoadedModel lm = load(c, *be);
  test::TempDir dir;
  Session a(*lm.model, lm.fingerprint, nullptr);
  a.append(test::random_tokens(45, c.spec.n_vocab, 6));
  a.prefill();
  ASSERT_EQ(a.n_pending(), 0);
  a.save(dir.file("prefilled.state"));
  Session b(*lm.model, lm.fingerprint, nullptr);
  b.load(dir.file("prefilled.state"));
  EXPECT_EQ(b.last_logits(), a.last_logits());
  EXPECT_EQ(b.generate(sampling(9), 10, {}).tokens, a.generate(sampling(9), 10, {}).tokens);
}

INSTANTIATE_TEST_SUITE_P(Random, StateRoundTrip, testing::ValuesIn(cases()),
                         [](const auto& i) { return std::string(i.param.label); });

class BadStateFile : public testing::Test {
 protected:
  void SetUp() override {
    lm = load(cases()[1], *be);
    Session s(*lm.model, lm.fingerprint, nullptr);
    s.append(test::random_tokens(20, 300, 7));
    s.generate(sampling(1), 5, {});
    good = dir.file("good.state");
    s.save(good);
    bytes = test::read_text(good);
  }
  // Loads `path` into a session that already holds a conversation; returns the error message and
  // checks that the session was left untouched.
  std::string load_error(const std::string& path, const LoadedModel* model = nullptr) {
    const LoadedModel& m = model ? *model : lm;
    Session s(*m.model, m.fingerprint, nullptr);
    s.append(test::random_tokens(3, 300, 8));
    s.prefill();
    const std::vector<int32_t> before = s.tokens();
    const std::vector<float> logits = s.last_logits();
    try {
      s.load(path);
    } catch (const Error& e) {
      EXPECT_EQ(s.tokens(), before);
      EXPECT_EQ(s.last_logits(), logits);
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
      return e.what();
    }
    ADD_FAILURE() << path << " loaded";
    return "";
  }
  std::string write(const std::string& name, const std::string& content) { return dir.write(name, content); }

  std::unique_ptr<Backend> be = make_reference_backend();
  LoadedModel lm;
  test::TempDir dir;
  std::string good, bytes;
};

TEST_F(BadStateFile, TruncatedAnywhere) {
  for (size_t n : {size_t(0), size_t(5), size_t(12), size_t(20), size_t(30), bytes.size() / 3, bytes.size() / 2,
                   bytes.size() - 9, bytes.size() - 1}) {
    SCOPED_TRACE("truncated to " + std::to_string(n) + " bytes");
    const std::string msg = load_error(write("cut.state", bytes.substr(0, n)));
    const bool named = msg.find("truncated") != std::string::npos || msg.find("not an rwkvx state file") != std::string::npos;
    EXPECT_TRUE(named) << msg;
  }
}

TEST_F(BadStateFile, CorruptedOrPadded) {
  std::string flipped = bytes;
  flipped[bytes.size() - 100] ^= 0x40;  // inside the KV payload
  EXPECT_NE(load_error(write("flip.state", flipped)).find("checksum mismatch"), std::string::npos);
  EXPECT_NE(load_error(write("pad.state", bytes + "x")).find("trailing bytes"), std::string::npos);
  std::string header = bytes;
  const size_t at = header.find("\"n_pending\":");
  ASSERT_NE(at, std::string::npos);
  header[at + 12] = 'x';  // no longer JSON
  EXPECT_NE(load_error(write("json.state", header)).find("not valid JSON"), std::string::npos);
}

TEST_F(BadStateFile, NotAStateFileOrAnotherVersion) {
  EXPECT_NE(load_error(write("text.state", "hello, I am not a state file at all......")).find("not an rwkvx state file"),
            std::string::npos);
  std::string v2 = bytes;
  v2[12] = 2;  // the u32 version after the 12-byte magic
  EXPECT_NE(load_error(write("v2.state", v2)).find("format version 2, this build reads version 1"), std::string::npos);
}

TEST_F(BadStateFile, AnotherModelOrOtherOptions) {
  // Same shapes, other weights: only the fingerprint tells them apart.
  RoundTripCase other = cases()[1];
  other.spec.seed = 99;
  LoadedModel lm2 = load(other, *be);
  ASSERT_NE(lm2.fingerprint, lm.fingerprint);
  EXPECT_NE(load_error(good, &lm2).find("state was saved from another model"), std::string::npos);
  // Another architecture.
  LoadedModel r7 = load(cases()[0], *be);
  const std::string msg = load_error(good, &r7);
  EXPECT_NE(msg.find("another model"), std::string::npos) << msg;
  EXPECT_NE(msg.find("rwkv7"), std::string::npos) << msg;
  // Same model, another chunk size.
  LoadedModel c16 = load(cases()[1], *be, 16);
  EXPECT_NE(load_error(good, &c16).find("--chunk-size 8, but the model now runs with --chunk-size 16"),
            std::string::npos);
  // Same model, eviction switched on.
  LoadedModel ev = load(cases()[2], *be);
  EXPECT_NE(load_error(good, &ev).find("--kv-evict-max 0, but the model now runs with --kv-evict-max 40"),
            std::string::npos);
  // Same model, bf16 KV cache.
  LoadedModel half = load(cases()[3], *be);
  EXPECT_NE(load_error(good, &half).find("--kv-dtype f32, but the model now runs with --kv-dtype bf16"),
            std::string::npos);
}

TEST_F(BadStateFile, CliReportsItAndLeavesNoPartialOutput) {
  const std::string model = test::write_random_model(dir, "m.safetensors", cases()[1].spec);
  const std::string cut = write("cut.state", bytes.substr(0, bytes.size() / 2));
  test::CliResult r = test::run_rwkvx(dir, {"generate", "--model", model, "--chunk-size", "8", "--state-in", cut,
                                            "--max-tokens", "2", "--state-out", dir.file("out.state")});
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(r.stderr_text.rfind("error: " + cut + ": truncated state file", 0), 0u) << r.stderr_text;
  EXPECT_FALSE(std::filesystem::exists(dir.file("out.state")));
  // The same model file continues the good state: the fingerprint is the file's, not the process's.
  test::CliResult ok = test::run_rwkvx(dir, {"generate", "--model", model, "--chunk-size", "8", "--state-in", good,
                                             "--max-tokens", "2", "--print-tokens", "--state-out", dir.file("out.state")});
  EXPECT_EQ(ok.status, 0) << ok.stderr_text;
  EXPECT_TRUE(std::filesystem::exists(dir.file("out.state")));
}

}  // namespace
}  // namespace rwkvx
