// `rwkvx eval passkey|loss|tasks` end to end on the golden models: deterministic output, PNG files,
// and bad inputs that exit with status 1 and a one-line message naming the problem.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "eval/eval_test_util.h"
#include "eval/plot.h"
#include "eval/tasks.h"

namespace rwkvx {
namespace {

using test::run_rwkvx;

std::vector<std::string> cat(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

uint32_t png_dim(const std::string& bytes, int offset) {
  if (bytes.size() < 24 || bytes.compare(0, 8, "\x89PNG\r\n\x1a\n") != 0 || bytes.compare(12, 4, "IHDR") != 0) return 0;
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data()) + offset;
  return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3];
}

class EvalCli : public testing::Test {
 protected:
  void SetUp() override { vocab = dir.write("vocab.txt", test::small_vocab_text()); }
  test::TempDir dir;
  std::string vocab;
};

TEST_F(EvalCli, PasskeyIsDeterministicAndWritesTheHeatmap) {
  const auto args = cat(cat({"eval", "passkey"}, test::golden_cli_args("rwkvx-tiny")),
                        {"--vocab", vocab, "--lengths", "300,600", "--depths", "0,0.5,1", "--trials", "2", "--json",
                         "--out-png", dir.file("pk.png")});
  const auto a = run_rwkvx(dir, args), b = run_rwkvx(dir, args);
  ASSERT_EQ(a.status, 0) << a.stderr_text;
  EXPECT_EQ(a.stdout_text, b.stdout_text);
  const auto j = nlohmann::json::parse(a.stdout_text);
  ASSERT_EQ(j["cells"].size(), 6u);
  EXPECT_EQ(j["cells"][0]["trials"][0]["key"], 2733);
  EXPECT_EQ(j["cells"][0]["filler_chars"], 1000);
  EXPECT_EQ(j["cells"][4]["depth_chars"], 1000);  // L = 600 (N = 2000), depth 0.5
  const std::string png = test::read_text(dir.file("pk.png"));
  // 2 lengths as columns right of the depth labels (at least as wide as the title); 3 depths as rows of 16
  // pixels between a margin of 8 and two lines of 12 (title, rows' name) above and below (lengths, their name).
  EXPECT_GE(png_dim(png, 16), uint32_t(2 * 8 + 2 * 24 + text_width("100%") + 6));
  EXPECT_EQ(png_dim(png, 20), uint32_t(2 * 8 + 4 * 12 + 3 * 16));
  const auto t = run_rwkvx(dir, cat(cat({"eval", "passkey"}, test::golden_cli_args("rwkvx-tiny")),
                                    {"--vocab", vocab, "--lengths", "300", "--depths", "0", "--trials", "1"}));
  ASSERT_EQ(t.status, 0) << t.stderr_text;
  EXPECT_NE(t.stdout_text.find("overall"), std::string::npos) << t.stdout_text;
}

TEST_F(EvalCli, PasskeyBadInputs) {
  const auto base = cat({"eval", "passkey"}, test::golden_cli_args("rwkv7-tiny"));
  const std::pair<std::vector<std::string>, std::string> cases[] = {
      {{"--vocab", vocab, "--lengths", "100"}, "too short"},
      {{"--vocab", vocab, "--lengths", "2K,abc"}, "'abc' is not a positive length"},
      {{"--vocab", vocab, "--lengths", "-5"}, "not a positive length"},
      {{"--vocab", vocab, "--lengths", "300", "--depths", "0,1.5"}, "'1.5' is not a fraction"},
      {{"--vocab", dir.file("missing-vocab.txt"), "--lengths", "300"}, "missing-vocab.txt"},
  };
  for (const auto& [extra, what] : cases) {
    const auto r = run_rwkvx(dir, cat(base, extra));
    EXPECT_EQ(r.status, 1) << what;
    EXPECT_NE(r.stderr_text.find("error: "), std::string::npos) << r.stderr_text;
    EXPECT_NE(r.stderr_text.find(what), std::string::npos) << r.stderr_text;
  }
  const auto m = run_rwkvx(dir, {"eval", "passkey", "--model", dir.file("nope.safetensors"), "--vocab", vocab, "--lengths", "300"});
  EXPECT_EQ(m.status, 1);
  EXPECT_NE(m.stderr_text.find("nope.safetensors"), std::string::npos) << m.stderr_text;
}

TEST_F(EvalCli, LossTwoModelsOnePlot) {
  std::string jl;
  for (int d = 0; d < 3; ++d) {
    std::string text;
    for (int i = 0; i < 12 + 4 * d; ++i) text += "The grass is green. The sky is blue number " + std::to_string(i * (d + 1)) + ". ";
    jl += nlohmann::json{{"text", text}}.dump() + "\n";
  }
  const std::string data = dir.write("docs.jsonl", jl);
  const std::vector<std::string> args = {"eval", "loss", "--model", test::golden_model_path("rwkvx-tiny"), "--model",
                                         test::golden_model_path("rwkv7-tiny"), "--chunk-size", "16", "--top-k", "3",
                                         "--data", data, "--vocab", vocab, "--buckets", "64,128,256", "--skip", "16",
                                         "--max-docs", "2", "--json", "--out-png", dir.file("loss.png")};
  const auto a = run_rwkvx(dir, args), b = run_rwkvx(dir, args);
  ASSERT_EQ(a.status, 0) << a.stderr_text;
  EXPECT_EQ(a.stdout_text, b.stdout_text);
  const auto j = nlohmann::json::parse(a.stdout_text);
  ASSERT_EQ(j["models"].size(), 2u);
  for (const auto& m : j["models"]) {
    ASSERT_EQ(m["buckets"].size(), 3u);
    EXPECT_EQ(m["buckets"][0]["docs"], 2);
    EXPECT_EQ(m["position_loss"].size(), 256u);
    EXPECT_GT(m["buckets"][2]["mean_loss"].get<double>(), 0.0);
  }
  EXPECT_NE(j["models"][0]["buckets"][0]["mean_loss"], j["models"][1]["buckets"][0]["mean_loss"]);
  const std::string png = test::read_text(dir.file("loss.png"));
  EXPECT_EQ(png_dim(png, 16), 800u);
  EXPECT_EQ(png_dim(png, 20), 500u);

  const auto bad = [&](std::vector<std::string> extra, const std::string& what) {
    const auto r = run_rwkvx(dir, cat({"eval", "loss", "--model", test::golden_model_path("rwkv7-tiny"), "--vocab", vocab}, extra));
    EXPECT_EQ(r.status, 1) << what;
    EXPECT_NE(r.stderr_text.find(what), std::string::npos) << r.stderr_text;
  };
  bad({"--data", dir.file("none.jsonl")}, "none.jsonl: cannot open");
  bad({"--data", dir.write("bad.jsonl", "{\"text\": \"a\"}\n{\"txt\": 1}\n")}, "bad.jsonl:2:");
  bad({"--data", data, "--buckets", "128,64"}, "must increase");
  bad({"--data", data, "--buckets", "64,128", "--ctx", "256"}, "differs from --ctx");
  bad({"--data", data, "--ctx", "100000", "--skip", "16"}, "no document has");
}

TEST_F(EvalCli, TasksDeterministicAndBadFiles) {
  const std::string t1 = dir.write("t1.jsonl",
                                   "{\"context\": \"The sky is\", \"choices\": [\"blue\", \"green\"], \"label\": 0}\n"
                                   "{\"context\": \"Here we\", \"choices\": [\"go\", \"back\", \"and\"], \"label\": 2}\n");
  const auto args = cat(cat({"eval", "tasks"}, test::golden_cli_args("rwkvx-tiny")), {"--vocab", vocab, "--tasks", t1, t1, "--json"});
  const auto a = run_rwkvx(dir, args), b = run_rwkvx(dir, args);
  ASSERT_EQ(a.status, 0) << a.stderr_text;
  EXPECT_EQ(a.stdout_text, b.stdout_text);
  const auto j = nlohmann::json::parse(a.stdout_text);
  ASSERT_EQ(j["tasks"].size(), 2u);
  EXPECT_EQ(j["tasks"][0]["n"], 2);
  EXPECT_EQ(j["tasks"][0]["examples"][1]["loglikelihood"].size(), 3u);
  // acc agrees with the printed log-likelihoods.
  int correct = 0;
  for (int e = 0; e < 2; ++e) {
    const auto ll = j["tasks"][0]["examples"][e]["loglikelihood"].get<std::vector<double>>();
    correct += int(std::max_element(ll.begin(), ll.end()) - ll.begin()) == (e == 0 ? 0 : 2);
  }
  EXPECT_EQ(j["tasks"][0]["acc"].get<double>(), correct / 2.0);

  const auto bad = run_rwkvx(dir, cat(cat({"eval", "tasks"}, test::golden_cli_args("rwkvx-tiny")),
                                      {"--vocab", vocab, "--tasks", t1, dir.write("bad.jsonl", "\n{\"context\": 1}\n")}));
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.stderr_text.find("bad.jsonl:2: \"context\" must be a string"), std::string::npos) << bad.stderr_text;
  const auto missing = run_rwkvx(dir, cat(cat({"eval", "tasks"}, test::golden_cli_args("rwkvx-tiny")),
                                          {"--vocab", vocab, "--tasks", dir.file("gone.jsonl")}));
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.stderr_text.find("gone.jsonl: cannot open"), std::string::npos) << missing.stderr_text;
  // The World vocabulary gives ids beyond the golden model's 300: an error naming the line, not a crash.
  const auto world = run_rwkvx(dir, cat(cat({"eval", "tasks"}, test::golden_cli_args("rwkvx-tiny")), {"--tasks", t1}));
  EXPECT_EQ(world.status, 1);
  EXPECT_NE(world.stderr_text.find("t1.jsonl:1: "), std::string::npos) << world.stderr_text;
}

}  // namespace
}  // namespace rwkvx
