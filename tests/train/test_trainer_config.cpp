// The pieces of `rwkvx train` that need no training run: config parsing (presets, every error names its
// key), SFT data encoding and order (spec system.md §4.9), and the loss-curve PNG.
#include <gtest/gtest.h>

#include <fstream>
#include <set>

#include "core/error.h"
#include "runtime/tokenizer.h"
#include "support/run_cli.h"
#include "support/test_util.h"
#include "train/data/sft_data.h"
#include "train/loss_plot.h"
#include "train/train_config.h"

namespace rwkvx::train {
namespace {

const std::string kBase = R"("model": "m.safetensors", "data": "d", "out_dir": "out")";

TrainConfig parse(const std::string& body) { return parse_train_config("{" + body + "}", "/cfg/run.json"); }

std::string error_of(const std::string& body) {
  try {
    parse(body);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(TrainConfig, PresetsFollowTheOfficialStages) {
  const TrainConfig s1 = parse(R"("stage": "stage1", )" + kBase);
  EXPECT_EQ(s1.stage, TrainStage::stage1);
  EXPECT_EQ(s1.ctx_len, 1024);
  EXPECT_EQ(s1.micro_bsz, 16);
  EXPECT_EQ(s1.loss, LossKind::ce);
  EXPECT_FALSE(s1.recompute);
  EXPECT_EQ(s1.eps, 1e-18);
  EXPECT_EQ(s1.weight_decay, 1e-3);
  EXPECT_EQ(s1.lr_init, 1e-5);
  EXPECT_EQ(s1.warmup_steps, 10);
  const TrainConfig s2 = parse(R"("stage": "stage2", )" + kBase);
  EXPECT_EQ(s2.ctx_len, 64000);
  EXPECT_EQ(s2.loss, LossKind::longce);
  EXPECT_TRUE(s2.recompute);
  const TrainConfig sft = parse(R"("stage": "sft", )" + kBase);
  EXPECT_EQ(sft.ctx_len, 4096);
  EXPECT_EQ(sft.lr_init, 2e-5);
  EXPECT_EQ(sft.lr_final, 1e-5);
  EXPECT_EQ(sft.warmup_steps, 0);
  EXPECT_EQ(sft.eps, 1e-8);
  EXPECT_EQ(sft.weight_decay, 0);
  EXPECT_EQ(sft.epoch_count, 2);
  // Relative paths are resolved against the config file's folder; absolute ones are kept.
  EXPECT_EQ(s1.model, "/cfg/m.safetensors");
  EXPECT_EQ(s1.out_dir, "/cfg/out");
  EXPECT_EQ(parse(R"("stage": "stage1", "model": "/abs/m.pth", "data": "d", "out_dir": "o")").model, "/abs/m.pth");
}

TEST(TrainConfig, KeysOverrideThePreset) {
  const TrainConfig c = parse(R"("stage": "stage2", )" + kBase + R"(, "ctx_len": 32, "micro_bsz": 3, "loss": "ce",
      "lr_init": 0.003, "lr_final": 0.001, "warmup_steps": 0, "weight_decay": 0, "eps": 1e-8, "grad_clip": 0,
      "param_groups": "blinkdl", "recompute": false, "seed": 7, "threads": 3, "parallel_sequences": 2, "chunk_size": 8, "top_k": 2,
      "save_every": 5, "save_formats": ["safetensors"], "save_dtype": "f32", "keep_states": 0, "log_every": 3,
      "steps": 100, "tokens": 0, "magic_prime": 71, "epoch_steps": 10, "epoch_count": 4, "epoch_begin": 1,
      "l2wrap": false, "pad_multiple": 0, "longce_truncated": 8, "longce_window": 4, "longce_cap": 5,
      "beta1": 0.8, "beta2": 0.95, "weight_decay_final": 0.0001, "vocab": "v.txt")");
  EXPECT_EQ(c.ctx_len, 32);
  EXPECT_EQ(c.micro_bsz, 3);
  EXPECT_EQ(c.loss, LossKind::ce);
  EXPECT_EQ(c.lr_init, 0.003);
  EXPECT_EQ(c.lr_final, 0.001);
  EXPECT_EQ(c.groups, GroupRule::blinkdl);
  EXPECT_FALSE(c.recompute);
  EXPECT_EQ(c.threads, 3);
  EXPECT_EQ(c.parallel_sequences, 2);
  EXPECT_EQ(c.chunk_size, 8);
  EXPECT_EQ(c.top_k, 2);
  EXPECT_FALSE(c.save_pth);
  EXPECT_TRUE(c.save_safetensors);
  EXPECT_EQ(c.save_dtype, DType::f32);
  EXPECT_EQ(c.magic_prime, 71u);
  EXPECT_EQ(c.tokens, 0);
  EXPECT_FALSE(c.l2wrap);
  EXPECT_EQ(c.longce_cap, 5.0);
  EXPECT_EQ(c.beta2, 0.95);
  EXPECT_EQ(c.vocab, "/cfg/v.txt");
}

TEST(TrainConfig, ErrorsNameTheKey) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "missing key 'stage'"},
      {R"("stage": "stage3", )" + kBase, "key 'stage': expected one of \"stage1\" | \"stage2\" | \"sft\""},
      {R"("stage": "stage1", "data": "d", "out_dir": "o")", "missing key 'model'"},
      {R"("stage": "stage1", "model": "m", "out_dir": "o")", "missing key 'data'"},
      {R"("stage": "stage1", "model": "m", "data": "d")", "missing key 'out_dir'"},
      {R"("stage": "stage1", )" + kBase + R"(, "lr": 1e-4)", "unknown key 'lr'"},
      {R"("stage": "stage1", )" + kBase + R"(, "ctx_len": "512")",
       "key 'ctx_len': expected an integer >= 1, got \"512\""},
      {R"("stage": "stage1", )" + kBase + R"(, "ctx_len": 0)", "key 'ctx_len': expected an integer >= 1, got 0"},
      {R"("stage": "stage1", )" + kBase + R"(, "micro_bsz": 2.5)", "key 'micro_bsz'"},
      {R"("stage": "stage1", )" + kBase + R"(, "lr_init": 0)", "key 'lr_init': expected a number > 0"},
      {R"("stage": "stage1", )" + kBase + R"(, "weight_decay": -1)", "key 'weight_decay'"},
      {R"("stage": "stage1", )" + kBase + R"(, "beta2": 1.0)", "key 'beta2': expected a number below 1"},
      {R"("stage": "stage1", )" + kBase + R"(, "loss": "mse")", "key 'loss': expected one of \"ce\" | \"longce\""},
      {R"("stage": "stage1", )" + kBase + R"(, "recompute": 1)", "key 'recompute': expected true or false"},
      {R"("stage": "stage1", )" + kBase + R"(, "save_formats": [])", "key 'save_formats'"},
      {R"("stage": "stage1", )" + kBase + R"(, "save_formats": ["gguf"])", "key 'save_formats'"},
      {R"("stage": "stage1", )" + kBase + R"(, "save_dtype": "f16")", "key 'save_dtype'"},
      {R"("stage": "stage1", )" + kBase + R"(, "model": "")", "key 'model': expected a non-empty string"},
      {R"("stage": "sft", )" + kBase + R"(, "loss": "longce")", "key 'loss': stage \"sft\""},
      {R"("stage": "sft", )" + kBase + R"(, "epoch_count": 0)", "key 'epoch_count'"},
      {R"("stage": "sft", )" + kBase + R"(, "tokens": 100)", "key 'tokens': applies to the pretraining stages"},
      {R"("stage": "sft", )" + kBase + R"(, "magic_prime": 5)", "key 'magic_prime'"},
      {R"("stage": "stage1", )" + kBase + R"(, "threads": 2, "parallel_sequences": 3)",
       "key 'parallel_sequences': 3 sequences at once need at least as many 'threads', got 2"},
  };
  for (const auto& [body, expect] : cases) {
    const std::string e = error_of(body);
    EXPECT_NE(e.find("/cfg/run.json: "), std::string::npos) << e;
    EXPECT_NE(e.find(expect), std::string::npos) << "config {" << body << "}\nerror: " << e;
  }
  try {
    parse_train_config("{\"stage\": ", "x.json");
    FAIL() << "truncated JSON accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("x.json: not valid JSON"), std::string::npos) << e.what();
  }
  try {
    parse_train_config("[1]", "x.json");
    FAIL() << "an array accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("x.json: expected a JSON object"), std::string::npos) << e.what();
  }
}

const std::string vocab = test::shared_dir() + "/data/rwkv_vocab_v20230424.txt";

TEST(SftData, LabelsCoverOnlyTheAssistantContent) {
  const Tokenizer tok = Tokenizer::load(vocab);
  const SftSample s = sft_encode(
      tok,
      R"({"system": "Be brief.", "conversations": [{"from": "User", "value": "  Hi\n\n \nthere  "},
          {"from": "assistant", "value": "Hello!"}, {"from": "user", "value": "Bye"},
          {"from": "assistant", "value": ""}]})",
      "t:1");
  // Each turn tokenized on its own; the system text joins the first user value; blank lines collapse.
  std::vector<int32_t> user1 = tok.encode("User: Be brief.\n  Hi\nthere\n\n");
  std::vector<int32_t> asst1 = tok.encode("Assistant: Hello!\n\n");
  std::vector<int32_t> user2 = tok.encode("User: Bye\n\n");
  std::vector<int32_t> asst2 = tok.encode("Assistant:");
  ASSERT_EQ(std::vector<int32_t>(asst1.begin(), asst1.begin() + 3), (std::vector<int32_t>{5585, 41693, 59}));
  std::vector<int32_t> ids, labels;
  auto add = [&](const std::vector<int32_t>& t, bool scored) {
    for (size_t i = 0; i < t.size(); ++i) {
      ids.push_back(t[i]);
      labels.push_back(scored && i >= 3 ? t[i] : -100);
    }
  };
  add(user1, false), add(asst1, true), add(user2, false), add(asst2, true);
  EXPECT_EQ(s.ids, ids);
  EXPECT_EQ(s.labels, labels);
  EXPECT_EQ(asst1.back(), 261);  // the closing "\n\n" is scored

  // The prompt/response shorthand is one user and one assistant turn.
  const SftSample p = sft_encode(tok, R"({"prompt": "Hi", "response": "Yo"})", "t:2");
  const SftSample c = sft_encode(
      tok, R"({"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Yo"}]})", "t:3");
  EXPECT_EQ(p.ids, c.ids);
  EXPECT_EQ(p.labels, c.labels);

  // Window: truncate / right-pad with 0, targets shifted by one, -100 past the sample.
  std::vector<int32_t> x, y;
  sft_window(p, int64_t(p.ids.size()) + 3, x, y);
  ASSERT_EQ(x.size(), p.ids.size() + 3);
  for (size_t t = 0; t < x.size(); ++t) {
    EXPECT_EQ(x[t], t < p.ids.size() ? p.ids[t] : 0) << t;
    EXPECT_EQ(y[t], t + 1 < p.ids.size() ? p.labels[t + 1] : -100) << t;
  }
  sft_window(p, 4, x, y);
  EXPECT_EQ(x, std::vector<int32_t>(p.ids.begin(), p.ids.begin() + 4));
  EXPECT_EQ(y[3], -100);

  for (const auto& [line, expect] : std::vector<std::pair<std::string, std::string>>{
           {R"({"prompt": "Hi"})", "t:9: no \"response\" field"},
           {R"({"conversations": [{"from": "bot", "value": "x"}]})", "\"from\" is \"bot\""},
           {R"({"text": "x"})", "expected \"conversations\""},
           {R"({"prompt": 1, "response": "x"})", "field \"prompt\" is a number"},
           {"{", "t:9: not valid JSON"}}) {
    try {
      sft_encode(tok, line, "t:9");
      ADD_FAILURE() << line << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(expect), std::string::npos) << e.what();
    }
  }
}

TEST(SftData, OrderVisitsEverySampleBelowThePrimeOncePerPass) {
  EXPECT_EQ(sft_prime(100), 89u);
  EXPECT_EQ(sft_prime(90), 89u);
  EXPECT_EQ(sft_prime(89), 83u);
  const uint64_t n = 30, p = sft_prime(n);
  ASSERT_EQ(p, 29u);
  std::set<uint64_t> first;
  for (uint64_t s = 0; s < p; ++s) first.insert(sft_sample_index(s, n, p, 1));
  EXPECT_EQ(first.size(), p);
  EXPECT_EQ(*first.rbegin(), p - 1);
  // Later passes draw from a permutation of all n samples: distinct within a pass, seed-dependent.
  std::set<uint64_t> second;
  std::vector<uint64_t> a, b;
  for (uint64_t s = p; s < 2 * p; ++s) {
    second.insert(sft_sample_index(s, n, p, 1));
    a.push_back(sft_sample_index(s, n, p, 1));
    b.push_back(sft_sample_index(s, n, p, 2));
  }
  EXPECT_EQ(second.size(), p);
  EXPECT_NE(a, b);
}

TEST(LossPlot, WritesAValidPng) {
  test::TempDir dir;
  std::vector<LossPoint> pts;
  for (int i = 1; i <= 300; ++i) pts.push_back({i, 3.0 / std::sqrt(double(i)) + 0.1 * ((i * 7) % 5)});
  const std::string path = dir.file("loss.png");
  write_loss_png(path, pts, 640, 320);
  const std::string bytes = test::read_text(path);
  ASSERT_GT(bytes.size(), 33u);
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_EQ(bytes.substr(12, 4), "IHDR");
  auto be32 = [&](size_t o) {
    return (uint32_t(uint8_t(bytes[o])) << 24) | (uint32_t(uint8_t(bytes[o + 1])) << 16) |
           (uint32_t(uint8_t(bytes[o + 2])) << 8) | uint32_t(uint8_t(bytes[o + 3]));
  };
  EXPECT_EQ(be32(16), 640u);
  EXPECT_EQ(be32(20), 320u);
  EXPECT_EQ(bytes.substr(bytes.size() - 8, 4), "IEND");
  // An empty curve still gives a picture (axes only), and a too small canvas is refused.
  write_loss_png(path, {}, 100, 90);
  const std::string empty = test::read_text(path);
  ASSERT_GT(empty.size(), 33u);
  EXPECT_EQ(empty.substr(12, 4), "IHDR");
  EXPECT_EQ(empty.substr(16, 8), std::string("\0\0\0\x64\0\0\0\x5a", 8));
  EXPECT_THROW(write_loss_png(path, pts, 10, 10), Error);
}

}  // namespace
}  // namespace rwkvx::train
