// The shipped default model (data/models/rwkvx-default.safetensors, issue 8): it loads with the shape and
// the sparse-attention settings it was trained with (from its metadata), within the size budget, the
// commands use it when --model is omitted, and a short passkey run on it is deterministic and finds the keys.
#include <gtest/gtest.h>

#include <filesystem>

#include "backend/cpu/cpu_backend.h"
#include "eval/passkey.h"
#include "model/config.h"
#include "model/formats/tensor_store.h"
#include "model/model.h"
#include "runtime/default_model.h"
#include "runtime/tokenizer.h"
#include "support/run_cli.h"

namespace rwkvx {
namespace {

TEST(DefaultModel, IsFoundAndLoadsWithItsStoredSettings) {
  const std::string path = default_model_path();
  ASSERT_TRUE(std::filesystem::is_regular_file(path)) << path;
  EXPECT_LE(std::filesystem::file_size(path), 25u * 1000 * 1000);
  const TensorStore s = load_checkpoint(path);
  EXPECT_EQ(s.metadata.at(kMetaChunkSize), "64");
  EXPECT_EQ(s.metadata.at(kMetaTopK), "3");
  for (const auto& [name, t] : s.tensors) EXPECT_EQ(t.dtype, DType::bf16) << name;
  const ModelConfig c = infer_config(s, ModelOptions{});
  EXPECT_EQ(c.arch, ArchKind::rwkvx);
  EXPECT_EQ(c.n_vocab, 65536);
  EXPECT_EQ(c.n_embd, 64);
  EXPECT_EQ(c.n_rwkv, 4);
  EXPECT_EQ(c.n_sparse, 2);
  EXPECT_EQ(c.sparse.chunk, 64);
  EXPECT_EQ(c.sparse.top_k, 3);
  EXPECT_EQ(c.block_order_str(), "R0 R1 M0 R2 R3 M1");
}

TEST(DefaultModel, ShortPasskeyRunIsDeterministic) {
  auto be = make_cpu_backend(CpuBackendOptions{});
  auto model = Model::load(default_model_path(), ModelOptions{}, *be);
  const Tokenizer tok = Tokenizer::load(default_vocab_path());
  PasskeyConfig cfg;
  cfg.lengths = {1000, 2000};
  cfg.depths = {0.2, 0.8};
  cfg.trials = 2;
  const std::vector<PasskeyCell> a = run_passkey(*model, tok, cfg), b = run_passkey(*model, tok, cfg);
  ASSERT_EQ(a.size(), 4u);
  ASSERT_EQ(b.size(), 4u);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].score, b[i].score);
    ASSERT_EQ(a[i].trials.size(), 2u);
    for (size_t k = 0; k < a[i].trials.size(); ++k) {
      EXPECT_EQ(a[i].trials[k].key, b[i].trials[k].key);
      EXPECT_EQ(a[i].trials[k].output, b[i].trials[k].output);
      EXPECT_GT(a[i].trials[k].prompt_tokens, 700);
    }
    // The model was trained to retrieve (README, "The default model": every key up to 16K tokens).
    EXPECT_EQ(a[i].score, 100.0) << "length " << a[i].length_label << " depth " << a[i].depth;
  }
  // A fresh model instance gives the same answers.
  auto model2 = Model::load(default_model_path(), ModelOptions{}, *be);
  const std::vector<PasskeyCell> c = run_passkey(*model2, tok, cfg);
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t k = 0; k < a[i].trials.size(); ++k) EXPECT_EQ(a[i].trials[k].output, c[i].trials[k].output);
}

TEST(DefaultModel, CommandsUseItWithoutModelOption) {
  test::TempDir dir;
  test::CliResult r = test::run_rwkvx(dir, {"info"});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  EXPECT_NE(r.stdout_text.find("rwkvx-default.safetensors"), std::string::npos) << r.stdout_text;
  EXPECT_NE(r.stdout_text.find("chunk 64 (checkpoint), top-k 3 (checkpoint)"), std::string::npos) << r.stdout_text;
  r = test::run_rwkvx(dir, {"generate", "--prompt", "In the beginning", "--max-tokens", "8", "--seed", "1",
                            "--print-tokens"});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  const std::string first = r.stdout_text;
  r = test::run_rwkvx(dir, {"generate", "--prompt", "In the beginning", "--max-tokens", "8", "--seed", "1",
                            "--print-tokens"});
  EXPECT_EQ(r.stdout_text, first);
  EXPECT_FALSE(first.empty());
}

}  // namespace
}  // namespace rwkvx
