// `rwkvx train` through the real binary on a tiny RWKV-X (2 RWKV blocks + 1 sparse block, chunks of 8 with
// top-2 so the sparse path selects) and a tiny binidx of a repetitive sequence: the loss falls, the run
// ends where the data or token budget does, LongCE settings reach the loss, stage 1 (also after expand)
// leaves every non-sparse weight bit-identical, a resumed run equals the uninterrupted one bit for bit
// (loss.csv and weights), Ctrl-C saves and exits 130, checkpoints load with Model::load, SFT runs on
// jsonl, bad inputs exit 1 naming the problem.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "model/formats/tensor_store.h"
#include "model/model.h"
#include "support/run_cli.h"
#include "support/test_util.h"
#include "train/data/binidx.h"

namespace rwkvx {
namespace {

using json = nlohmann::json;

RandomModelSpec tiny_spec(int64_t n_sparse, DType dtype = DType::f32, int64_t n_vocab = 16) {
  RandomModelSpec s;
  s.n_vocab = n_vocab, s.n_embd = 64, s.head_size = 32, s.n_rwkv = 2, s.n_sparse = n_sparse;
  s.dim_w = s.dim_a = s.dim_v = s.dim_g = 8;
  s.dtype = dtype;
  s.seed = 42;
  return s;
}

// Period-12 pattern with ambiguous bigrams in documents of 600 tokens: 8 documents give 150 windows of 32
// (magic prime 149), 4 give 75 (magic prime 71).
std::string write_pattern_data(const test::TempDir& dir, int n_docs = 8) {
  static const int32_t p[12] = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8};
  const std::string prefix = dir.file("pattern" + std::to_string(n_docs));
  BinIdxWriter w(prefix, BinIdxDType::u16);
  for (int d = 0; d < n_docs; ++d) {
    std::vector<int32_t> doc(600);
    for (size_t i = 0; i < doc.size(); ++i) doc[i] = p[(size_t(d) * 600 + i) % 12];
    w.add_document(doc);
  }
  w.finish();
  return prefix;
}

json base_config(const std::string& model, const std::string& data, const std::string& out) {
  return json{{"stage", "stage2"}, {"model", model}, {"data", data}, {"out_dir", out}, {"ctx_len", 32},
              {"micro_bsz", 1}, {"loss", "ce"}, {"chunk_size", 8}, {"top_k", 2}, {"lr_init", 3e-3},
              {"lr_final", 3e-3}, {"warmup_steps", 10}, {"weight_decay", 0.0}, {"eps", 1e-8}, {"tokens", 0},
              {"recompute", true}, {"save_formats", {"safetensors"}}, {"save_dtype", "f32"},
              // Vocab 16 has no pad token 261; 32 needs no padding anyway.
              {"pad_multiple", 0}};
}

std::string write_config(const test::TempDir& dir, const std::string& name, const json& cfg) {
  return dir.write(name, cfg.dump(2));
}

struct CsvRow {
  int64_t step;
  double loss;
};
std::vector<CsvRow> read_csv(const std::string& path) {
  std::istringstream in(test::read_text(path));
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "step,tokens,loss,lr,grad_norm");
  std::vector<CsvRow> rows;
  while (std::getline(in, line)) {
    CsvRow r{};
    long long step = 0, tokens = 0;
    EXPECT_EQ(std::sscanf(line.c_str(), "%lld,%lld,%lf", &step, &tokens, &r.loss), 3) << line;
    r.step = step;
    rows.push_back(r);
  }
  return rows;
}

double mean_loss(const std::vector<CsvRow>& rows, size_t begin, size_t end) {
  double s = 0;
  for (size_t i = begin; i < end; ++i) s += rows[i].loss;
  return s / double(end - begin);
}

TEST(TrainCli, LossFallsOnARepetitiveDataset) {
  test::TempDir dir;
  const std::string model = test::write_random_model(dir, "m.safetensors", tiny_spec(1));
  const std::string data = write_pattern_data(dir);
  json cfg = base_config(model, data, dir.file("out"));
  cfg["steps"] = 100;
  cfg["log_every"] = 25;
  const test::CliResult r = test::run_rwkvx(dir, {"train", write_config(dir, "c.json", cfg)});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  const std::vector<CsvRow> rows = read_csv(dir.file("out/loss.csv"));
  ASSERT_EQ(rows.size(), 100u);
  for (size_t i = 0; i < rows.size(); ++i) EXPECT_EQ(rows[i].step, int64_t(i) + 1);
  const double first = rows[0].loss, last = mean_loss(rows, 90, 100);
  RecordProperty("loss_step1", std::to_string(first));
  RecordProperty("loss_last10", std::to_string(last));
  // Stated margin: from about ln 16 = 2.8 nats at step 1 (random weights) to a mean below 0.3 over the
  // last 10 steps, and below a tenth of the start.
  EXPECT_GT(first, 2.0);
  EXPECT_LT(last, 0.3);
  EXPECT_LT(last, first / 10);
  // Progress lines on a non-terminal stderr: the first step, every 25th, the last; tokens/s and ETA shown.
  EXPECT_NE(r.stderr_text.find("step 1/100"), std::string::npos) << r.stderr_text;
  EXPECT_NE(r.stderr_text.find("step 50/100"), std::string::npos) << r.stderr_text;
  EXPECT_EQ(r.stderr_text.find("step 51/100"), std::string::npos) << r.stderr_text;
  EXPECT_NE(r.stderr_text.find("tokens/s"), std::string::npos);
  EXPECT_NE(r.stderr_text.find("ETA"), std::string::npos);
  EXPECT_NE(r.stderr_text.find("magic_prime 149"), std::string::npos) << r.stderr_text;
  // The PNG: signature and IHDR size.
  const std::string png = test::read_text(dir.file("out/loss.png"));
  ASSERT_GT(png.size(), 24u);
  EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_EQ(png.substr(12, 4), "IHDR");
  EXPECT_EQ(png.substr(16, 8), std::string("\0\0\x03\x20\0\0\x01\x90", 8));  // 800 x 400
  // The final checkpoint loads in the inference engine and its logits differ from the start's.
  auto be = make_reference_backend();
  auto trained = Model::load(dir.file("out/rwkv-final.safetensors"), ModelOptions{}, *be);
  EXPECT_EQ(trained->config().n_sparse, 1);
  EXPECT_TRUE(std::filesystem::exists(dir.file("out/state-00000100/state.json")));
}

TEST(TrainCli, RunEndsWhenTheWindowsOrTheTokenBudgetAreUsedUp) {
  test::TempDir dir;
  const std::string model = test::write_random_model(dir, "m.safetensors", tiny_spec(1));
  const std::string data = write_pattern_data(dir, 4);  // magic prime 71
  // No step limit, no token budget: the last window the prime addresses ends the run (real_step = 71 / 4 − 1).
  json cfg = base_config(model, data, dir.file("windows"));
  cfg["micro_bsz"] = 4;
  test::CliResult r = test::run_rwkvx(dir, {"train", write_config(dir, "w.json", cfg)});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  EXPECT_EQ(read_csv(dir.file("windows/loss.csv")).size(), 17u);
  // A token budget of 800 at 32 tokens per step: the cosine's progress reaches 1 at step 25 (§4.6).
  cfg = base_config(model, data, dir.file("budget"));
  cfg["tokens"] = 800;
  r = test::run_rwkvx(dir, {"train", write_config(dir, "b.json", cfg)});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  EXPECT_EQ(read_csv(dir.file("budget/loss.csv")).size(), 25u);
  EXPECT_NE(r.stderr_text.find("plan: 25 steps"), std::string::npos) << r.stderr_text;
}

TEST(TrainCli, LongCeWeightsReachTheLoss) {
  test::TempDir dir;
  const std::string model = test::write_random_model(dir, "m.safetensors", tiny_spec(1));
  const std::string data = write_pattern_data(dir);
  json cfg = base_config(model, data, dir.file("ce"));
  cfg["steps"] = 2;
  ASSERT_EQ(test::run_rwkvx(dir, {"train", write_config(dir, "ce.json", cfg)}).status, 0);
  // LongCE with short windows (8 tokens of context, 8 scored per window) on the same first batch: the
  // same weights give a different loss because positions 16..31 are reweighted.
  cfg["out_dir"] = dir.file("longce");
  cfg["loss"] = "longce";
  cfg["longce_truncated"] = 8;
  cfg["longce_window"] = 8;
  const test::CliResult r = test::run_rwkvx(dir, {"train", write_config(dir, "l.json", cfg)});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  EXPECT_NE(r.stderr_text.find("loss longce"), std::string::npos) << r.stderr_text;
  const std::vector<CsvRow> ce = read_csv(dir.file("ce/loss.csv")), lc = read_csv(dir.file("longce/loss.csv"));
  ASSERT_EQ(ce.size(), 2u);
  ASSERT_EQ(lc.size(), 2u);
  EXPECT_TRUE(std::isfinite(lc[0].loss));
  EXPECT_GT(std::fabs(lc[0].loss - ce[0].loss), 1e-6 * ce[0].loss) << lc[0].loss << " vs " << ce[0].loss;
}

TEST(TrainCli, ExpandThenStage1) {
  test::TempDir dir;
  // The README pipeline on a tiny RWKV-7: expand (paper init: zero output projections), then stage 1.
  const std::string rwkv7 = test::write_random_model(dir, "r7.safetensors", tiny_spec(0, DType::bf16));
  const std::string expanded = dir.file("x.pth");
  test::CliResult r = test::run_rwkvx(dir, {"expand", "--model", rwkv7, "--out", expanded, "--sparse-layers", "1"});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  json cfg = base_config(expanded, write_pattern_data(dir), dir.file("out"));
  cfg["stage"] = "stage1";
  cfg["steps"] = 4;
  cfg["save_formats"] = {"pth"};
  cfg["save_dtype"] = "bf16";
  r = test::run_rwkvx(dir, {"train", write_config(dir, "s1.json", cfg)});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  const TensorStore before = load_checkpoint(expanded), after = load_checkpoint(dir.file("out/rwkv-final.pth"));
  ASSERT_EQ(before.tensors.size(), after.tensors.size());
  int changed = 0;
  for (const auto& [name, t] : before.tensors) {
    const StoredTensor& a = after.get(name);
    const bool same = a.nbytes() == t.nbytes() && std::equal(t.data, t.data + t.nbytes(), a.data);
    if (name.starts_with("rwkv."))
      EXPECT_TRUE(same) << name;
    else
      changed += !same;
  }
  EXPECT_GT(changed, 0);
  // The zero-initialised output projection is the first thing that moves.
  auto all_zero = [](const StoredTensor& t) {
    return std::all_of(t.data, t.data + t.nbytes(), [](uint8_t b) { return b == 0; });
  };
  EXPECT_TRUE(all_zero(before.get("moba.0.att.output.weight")));
  EXPECT_FALSE(all_zero(after.get("moba.0.att.output.weight")));
}

TEST(TrainCli, Stage1ChangesOnlyTheSparseBlocks) {
  test::TempDir dir;
  // bf16 weights in and out: a frozen tensor must come back with the very same bytes.
  const std::string model = test::write_random_model(dir, "m.safetensors", tiny_spec(1, DType::bf16));
  const std::string data = write_pattern_data(dir);
  json cfg = base_config(model, data, dir.file("out"));
  cfg["stage"] = "stage1";
  cfg["steps"] = 6;
  cfg["micro_bsz"] = 2;
  cfg["lr_init"] = cfg["lr_final"] = 1e-2;
  cfg["warmup_steps"] = 0;
  cfg["save_formats"] = {"pth", "safetensors"};
  cfg["save_dtype"] = "bf16";
  const test::CliResult r = test::run_rwkvx(dir, {"train", write_config(dir, "c.json", cfg)});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  const TensorStore before = load_checkpoint(model);
  for (const char* file : {"out/rwkv-final.pth", "out/rwkv-final.safetensors"}) {
    const TensorStore after = load_checkpoint(dir.file(file));
    ASSERT_EQ(after.tensors.size(), before.tensors.size()) << file;
    int frozen = 0, changed_sparse = 0;
    for (const auto& [name, t] : before.tensors) {
      const StoredTensor& a = after.get(name);
      ASSERT_EQ(a.dtype, DType::bf16) << name;
      ASSERT_EQ(a.shape, t.shape) << name;
      const bool same = std::equal(t.data, t.data + t.nbytes(), a.data);
      if (name.starts_with("rwkv.")) {
        EXPECT_TRUE(same) << file << ": frozen tensor " << name << " changed";
        ++frozen;
      } else {
        ASSERT_TRUE(name.starts_with("moba.")) << name;
        changed_sparse += !same;
      }
    }
    EXPECT_GT(frozen, 20) << file;
    // Zero-initialised output projections and the rest of the sparse block move.
    EXPECT_GT(changed_sparse, 5) << file;
    auto be = make_reference_backend();
    auto m = Model::load(dir.file(file), ModelOptions{}, *be);
    EXPECT_EQ(m->config().n_sparse, 1) << file;
    EXPECT_EQ(m->config().n_rwkv, 2) << file;
  }
  // The optimizer state holds moments for the sparse tensors only.
  const TensorStore opt = load_checkpoint(dir.file("out/state-00000006/optimizer.safetensors"));
  for (const auto& [name, t] : opt.tensors) EXPECT_NE(name.find(".moba."), std::string::npos) << name;
  EXPECT_FALSE(opt.tensors.empty());
}

TEST(TrainCli, ResumeEqualsTheUninterruptedRun) {
  test::TempDir dir;
  const std::string model = test::write_random_model(dir, "m.safetensors", tiny_spec(1));
  const std::string data = write_pattern_data(dir);
  // Batch of 3 with a warmup across the interruption and weight decay on, so every piece of state counts.
  json cfg = base_config(model, data, dir.file("full"));
  cfg["micro_bsz"] = 3;
  cfg["weight_decay"] = 0.01;
  cfg["steps"] = 12;
  cfg["save_every"] = 4;
  ASSERT_EQ(test::run_rwkvx(dir, {"train", write_config(dir, "full.json", cfg)}).status, 0);

  cfg["out_dir"] = dir.file("split");
  cfg["steps"] = 7;
  test::CliResult a = test::run_rwkvx(dir, {"train", write_config(dir, "a.json", cfg)});
  ASSERT_EQ(a.status, 0) << a.stderr_text;
  // The continuation extends the run to 12 steps with 3 threads over 2 sequences at once, so one slot's
  // ops run on 2 threads (neither changes the arithmetic).
  cfg["steps"] = 12;
  cfg["threads"] = 3;
  cfg["parallel_sequences"] = 2;
  const std::string b_cfg = write_config(dir, "b.json", cfg);
  test::CliResult b = test::run_rwkvx(dir, {"train", b_cfg, "--resume", dir.file("split")});
  ASSERT_EQ(b.status, 0) << b.stderr_text;
  EXPECT_NE(b.stderr_text.find("resuming from " + dir.file("split/state-00000007") + " at step 7"), std::string::npos)
      << b.stderr_text;

  const std::string full_csv = test::read_text(dir.file("full/loss.csv"));
  EXPECT_EQ(std::count(full_csv.begin(), full_csv.end(), '\n'), 13);
  EXPECT_EQ(test::read_text(dir.file("split/loss.csv")), full_csv);
  EXPECT_EQ(test::read_text(dir.file("split/rwkv-final.safetensors")),
            test::read_text(dir.file("full/rwkv-final.safetensors")));
  EXPECT_EQ(test::read_text(dir.file("split/state-00000012/optimizer.safetensors")),
            test::read_text(dir.file("full/state-00000012/optimizer.safetensors")));
  // keep_states 2: the uninterrupted run keeps its two newest states (8 and 12), and step 8's checkpoint.
  EXPECT_FALSE(std::filesystem::exists(dir.file("full/state-00000004")));
  EXPECT_TRUE(std::filesystem::exists(dir.file("full/state-00000008/weights.safetensors")));
  EXPECT_TRUE(std::filesystem::exists(dir.file("full/rwkv-8.safetensors")));

  // A resume from an explicit earlier state (step 4 of the split run is gone; use the full run's step 8)
  // into a fresh out_dir also ends on the same weights.
  cfg["out_dir"] = dir.file("from8");
  ASSERT_EQ(test::run_rwkvx(dir, {"train", write_config(dir, "c8.json", cfg), "--resume",
                                  dir.file("full/state-00000008/state.json")}).status, 0);
  EXPECT_EQ(test::read_text(dir.file("from8/rwkv-final.safetensors")),
            test::read_text(dir.file("full/rwkv-final.safetensors")));

  // Changing a setting that shapes the trajectory is refused, naming the key.
  cfg["out_dir"] = dir.file("split");
  cfg["lr_init"] = 1e-3;
  test::CliResult c = test::run_rwkvx(dir, {"train", write_config(dir, "c.json", cfg), "--resume", dir.file("split")});
  EXPECT_EQ(c.status, 1);
  EXPECT_NE(c.stderr_text.find("key 'lr_init'"), std::string::npos) << c.stderr_text;
}

// `device: cuda`: with a GPU the steps run there (the loss falls as on the CPU, and a resumed run equals
// the uninterrupted one bit for bit: every GPU reduction has a fixed order); without one (CI) the run says
// so and trains on the CPU.
TEST(TrainCli, CudaDeviceTrainsOrFallsBackToTheCpu) {
  test::TempDir dir;
  const std::string model = test::write_random_model(dir, "m.safetensors", tiny_spec(1));
  const std::string data = write_pattern_data(dir);
  json cfg = base_config(model, data, dir.file("full"));
  cfg["steps"] = 60;
  cfg["micro_bsz"] = 2;
  cfg["save_every"] = 40;
  cfg["device"] = "cuda";
  cfg["bf16"] = false;
  const test::CliResult r = test::run_rwkvx(dir, {"train", write_config(dir, "full.json", cfg)});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  const bool on_gpu = r.stderr_text.find("device: cuda (fp32 products") != std::string::npos;
  RecordProperty("ran_on", on_gpu ? "cuda" : "cpu");
  if (!on_gpu) {
    EXPECT_NE(r.stderr_text.find("training on the CPU"), std::string::npos) << r.stderr_text;
  }
  const std::vector<CsvRow> rows = read_csv(dir.file("full/loss.csv"));
  ASSERT_EQ(rows.size(), 60u);
  EXPECT_LT(mean_loss(rows, 50, 60), rows[0].loss / 5);
  // Stop at 40 (a state), resume to 60 with the device named on the command line instead.
  cfg["out_dir"] = dir.file("split");
  cfg["steps"] = 40;
  cfg.erase("device");
  ASSERT_EQ(test::run_rwkvx(dir, {"train", write_config(dir, "a.json", cfg), "--device", "cuda"}).status, 0);
  cfg["steps"] = 60;
  const test::CliResult b =
      test::run_rwkvx(dir, {"train", write_config(dir, "b.json", cfg), "--device", "cuda", "--resume", dir.file("split")});
  ASSERT_EQ(b.status, 0) << b.stderr_text;
  EXPECT_EQ(test::read_text(dir.file("split/loss.csv")), test::read_text(dir.file("full/loss.csv")));
  EXPECT_EQ(test::read_text(dir.file("split/rwkv-final.safetensors")),
            test::read_text(dir.file("full/rwkv-final.safetensors")));
  // A device the trainer does not know is refused, naming the key.
  cfg["device"] = "tpu";
  const test::CliResult bad = test::run_rwkvx(dir, {"train", write_config(dir, "bad.json", cfg)});
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.stderr_text.find("key 'device'"), std::string::npos) << bad.stderr_text;
}

TEST(TrainCli, CtrlCSavesAStateAndExits130) {
  test::TempDir dir;
  const std::string model = test::write_random_model(dir, "m.safetensors", tiny_spec(1));
  // Enough data and steps that the run cannot end on its own before the signal, which is sent once the
  // first progress line (step 10) is out, however fast this machine trains.
  const int64_t steps = 20000;
  const std::string data = write_pattern_data(dir, 1200);
  json cfg = base_config(model, data, dir.file("out"));
  cfg["steps"] = steps;
  const std::string c = write_config(dir, "c.json", cfg), err_file = test::shell_quote(dir.file("err.txt"));
  const std::string cmd = test::shell_quote(RWKVX_BINARY) + " train " + test::shell_quote(c) + " >/dev/null 2>" +
                          err_file + " & pid=$!; i=0; while [ $i -lt 1200 ] && ! grep -q '^step ' " + err_file +
                          "; do sleep 0.05; i=$((i+1)); done; kill -INT $pid; wait $pid";
  const int rc = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(rc));
  const std::string err = test::read_text(dir.file("err.txt"));
  ASSERT_EQ(WEXITSTATUS(rc), 130) << err;
  long long step = 0;
  const size_t at = err.find("interrupted after step ");
  ASSERT_NE(at, std::string::npos) << err;
  ASSERT_EQ(std::sscanf(err.c_str() + at, "interrupted after step %lld", &step), 1);
  EXPECT_GT(step, 0);
  EXPECT_LT(step, steps);
  EXPECT_NE(err.find("--resume " + dir.file("out")), std::string::npos) << err;
  char state[32];
  std::snprintf(state, sizeof state, "out/state-%08lld/state.json", step);
  EXPECT_TRUE(std::filesystem::exists(dir.file(state))) << state;
  EXPECT_TRUE(std::filesystem::exists(dir.file("out/rwkv-" + std::to_string(step) + ".safetensors")));
  EXPECT_EQ(read_csv(dir.file("out/loss.csv")).size(), size_t(step));
}

TEST(TrainCli, SftTrainsOnJsonlConversations) {
  test::TempDir dir;
  const std::string vocab = test::shared_dir() + "/data/rwkv_vocab_v20230424.txt";
  const std::string model = test::write_random_model(dir, "m.safetensors", tiny_spec(1, DType::f32, 65536));
  std::string jsonl;
  for (int i = 0; i < 7; ++i)
    jsonl += "{\"prompt\": \"What is " + std::to_string(i) + " plus one?\", \"response\": \"" + std::to_string(i + 1) +
             ".\"}\n";
  jsonl += R"({"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello."}]})"
           "\n";
  const std::string data = dir.write("sft.jsonl", jsonl);
  json cfg = base_config(model, data, dir.file("out"));
  cfg["stage"] = "sft";
  cfg["vocab"] = vocab;
  cfg["micro_bsz"] = 2;
  cfg["epoch_steps"] = 2;
  cfg["epoch_count"] = 2;
  cfg.erase("tokens");
  cfg.erase("pad_multiple");  // the official 16 (261 is in this vocab)
  test::CliResult r = test::run_rwkvx(dir, {"train", write_config(dir, "c.json", cfg)});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  EXPECT_NE(r.stderr_text.find("8 SFT samples (prime 5)"), std::string::npos) << r.stderr_text;
  const std::vector<CsvRow> rows = read_csv(dir.file("out/loss.csv"));
  ASSERT_EQ(rows.size(), 4u);  // epoch_count x epoch_steps
  for (const CsvRow& row : rows) EXPECT_TRUE(std::isfinite(row.loss) && row.loss > 0) << row.loss;

  // A malformed line is named.
  const std::string bad = dir.write("bad.jsonl", "{\"prompt\": \"x\", \"response\": \"y\"}\n{\"prompt\": \"x\"}\n");
  cfg["data"] = bad;
  cfg["out_dir"] = dir.file("out_bad");
  r = test::run_rwkvx(dir, {"train", write_config(dir, "bad.json", cfg)});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.stderr_text.find("bad.jsonl:2: no \"response\" field"), std::string::npos) << r.stderr_text;
}

TEST(TrainCli, BadInputsExitNonZeroWithClearMessages) {
  test::TempDir dir;
  const std::string model = test::write_random_model(dir, "m.safetensors", tiny_spec(1));
  const std::string rwkv7 = test::write_random_model(dir, "r7.safetensors", tiny_spec(0));
  const std::string data = write_pattern_data(dir);
  const std::string not_a_model = dir.write("junk.pth", "this is not a checkpoint");
  // Tokens beyond the model's vocab (16).
  {
    BinIdxWriter w(dir.file("wide"), BinIdxDType::u16);
    w.add_document(std::vector<int32_t>(400, 300));
    w.finish();
  }
  struct Case {
    std::string what;
    json change;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"missing data", {{"data", dir.file("nope")}}, dir.file("nope") + ".idx"},
      {"missing model", {{"model", dir.file("none.pth")}}, "key 'model': " + dir.file("none.pth") + ": no such file"},
      {"not a model", {{"model", not_a_model}}, not_a_model},
      {"stage1 on RWKV-7", {{"model", rwkv7}, {"stage", "stage1"}}, "stage1 trains only the sparse-attention blocks"},
      {"ids beyond the vocab", {{"data", dir.file("wide")}}, dir.file("wide")},
      {"too little data", {{"ctx_len", 2000}}, "too few for ctx_len 2000"},
      {"unknown key", {{"learning_rate", 1}}, "unknown key 'learning_rate'"},
  };
  for (const Case& c : cases) {
    json cfg = base_config(model, data, dir.file("out"));
    cfg["steps"] = 2;
    cfg.update(c.change);
    const test::CliResult r = test::run_rwkvx(dir, {"train", write_config(dir, "bad.json", cfg)});
    EXPECT_EQ(r.status, 1) << c.what;
    EXPECT_NE(r.stderr_text.find("error: "), std::string::npos) << c.what << ": " << r.stderr_text;
    EXPECT_NE(r.stderr_text.find(c.expect), std::string::npos) << c.what << ": " << r.stderr_text;
  }
  // A fresh run into an out_dir that holds a run already.
  json cfg = base_config(model, data, dir.file("out3"));
  cfg["steps"] = 1;
  ASSERT_EQ(test::run_rwkvx(dir, {"train", write_config(dir, "once.json", cfg)}).status, 0);
  const test::CliResult again = test::run_rwkvx(dir, {"train", write_config(dir, "once.json", cfg)});
  EXPECT_EQ(again.status, 1);
  EXPECT_NE(again.stderr_text.find(dir.file("out3") + " already holds a training run (state-00000001)"),
            std::string::npos)
      << again.stderr_text;
  // --resume with nothing to resume.
  cfg = base_config(model, data, dir.file("out2"));
  const test::CliResult r =
      test::run_rwkvx(dir, {"train", write_config(dir, "ok.json", cfg), "--resume", dir.file("")});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.stderr_text.find("no training state found"), std::string::npos) << r.stderr_text;
}

// Data parallel (docs/training.md): several processes need device cuda; the launcher forwards the ranks'
// failure. (The message depends on the build: CUDA builds need device cuda, others refuse outright. The
// GPU runs themselves are measured on the device machine, BENCHMARKS.md.)
TEST(TrainCli, DataParallelNeedsCudaAndTheLauncherForwardsFailures) {
  test::TempDir dir;
  const std::string model = test::write_random_model(dir, "m.safetensors", tiny_spec(1));
  const std::string c = write_config(dir, "c.json", base_config(model, write_pattern_data(dir), dir.file("out")));
  const std::string err_file = test::shell_quote(dir.file("err.txt"));
  std::string cmd = "WORLD_SIZE=2 RANK=1 RWKVX_DIST_INIT=file://" + dir.file("rdv") + " " +
                    test::shell_quote(RWKVX_BINARY) + " train " + test::shell_quote(c) + " >/dev/null 2>" + err_file;
  int rc = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(rc));
  EXPECT_EQ(WEXITSTATUS(rc), 1);
  std::string err = test::read_text(dir.file("err.txt"));
  EXPECT_NE(err.find("WORLD_SIZE=2: data-parallel training"), std::string::npos) << err;
  cmd = "WORLD_SIZE=2 " + test::shell_quote(RWKVX_BINARY) + " train " + test::shell_quote(c) + " >/dev/null 2>" +
        err_file;
  rc = std::system(cmd.c_str());
  EXPECT_EQ(WEXITSTATUS(rc), 1);
  err = test::read_text(dir.file("err.txt"));
  EXPECT_NE(err.find("RANK is not set"), std::string::npos) << err;
  cmd = test::shell_quote(std::string(RWKVX_SOURCE_DIR) + "/scripts/launch_dp.sh") + " 2 " +
        test::shell_quote(RWKVX_BINARY) + " train " + test::shell_quote(c) + " >/dev/null 2>" + err_file;
  rc = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(rc));
  EXPECT_EQ(WEXITSTATUS(rc), 1);
  err = test::read_text(dir.file("err.txt"));
  EXPECT_NE(err.find("WORLD_SIZE=2: data-parallel training"), std::string::npos) << err;
  EXPECT_NE(err.find("launch_dp.sh: rank"), std::string::npos) << err;
  EXPECT_FALSE(std::filesystem::exists(dir.file("out/loss.csv")));
}

}  // namespace
}  // namespace rwkvx
