// `rwkvx data`, `rwkvx expand` and `rwkvx grad` through the real binary: expected token ids for a small jsonl (the
// tokenizer golden cases, each followed by the end-of-document 0), the text splits, epochs and seeded
// shuffles, the magic_prime line, and bad inputs exiting 1 with a message naming the problem.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/model.h"
#include "runtime/tokenizer.h"
#include "support/run_cli.h"
#include "support/test_util.h"
#include "train/data/binidx.h"
#include "train/train_model.h"

namespace rwkvx {
namespace {

const std::string vocab = test::shared_dir() + "/data/rwkv_vocab_v20230424.txt";

std::vector<std::vector<int32_t>> items(const std::string& prefix) {
  BinIdxDataset d = BinIdxDataset::open(prefix);
  std::vector<std::vector<int32_t>> out;
  for (uint64_t k = 0; k < d.n_items(); ++k) out.push_back(d.item(k));
  return out;
}

TEST(DataCli, JsonlGivesTheExpectedTokenIds) {
  test::TempDir dir;
  // The tokenizer golden cases are jsonl with a "text" field and the expected "ids".
  const std::string cases = test::golden_dir("tokenizer") + "/cases.jsonl";
  std::vector<std::vector<int32_t>> expect;
  std::ifstream in(cases);
  std::string line;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    std::vector<int32_t> ids = nlohmann::json::parse(line)["ids"].get<std::vector<int32_t>>();
    ids.push_back(0);
    expect.push_back(ids);
  }
  ASSERT_GE(expect.size(), 5u);
  // Blank lines between records are skipped, as make_data.py skips them.
  std::string text = test::read_text(cases);
  const std::string input = dir.write("cases.jsonl", "\n  \n" + text + "\n\n");
  const std::string out = dir.file("cases");
  test::CliResult r = test::run_rwkvx(dir, {"data", "--input", input, "--out", out, "--vocab", vocab, "--ctx-len", "4"});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  EXPECT_EQ(items(out), expect);
  uint64_t total = 0;
  for (const auto& d : expect) total += d.size();
  EXPECT_NE(r.stdout_text.find(std::to_string(expect.size()) + " documents, " + std::to_string(total) + " tokens (uint16)"),
            std::string::npos)
      << r.stdout_text;
  EXPECT_NE(r.stdout_text.find("--my_exit_tokens " + std::to_string(total) + " --magic_prime "), std::string::npos)
      << r.stdout_text;
  EXPECT_NE(r.stderr_text.find("tokens/s"), std::string::npos) << r.stderr_text;

  // Another field name; the same documents twice with --epochs 2; a seeded shuffle is a permutation,
  // the same for the same seed.
  const std::string renamed = dir.write("r.jsonl", "{\"body\": \"Hello world!\", \"text\": 5}\n");
  ASSERT_EQ(test::run_rwkvx(dir, {"data", "--input", renamed, "--out", dir.file("r"), "--vocab", vocab,
                                  "--text-field", "body"}).status, 0);
  EXPECT_EQ(items(dir.file("r")), (std::vector<std::vector<int32_t>>{{33155, 40213, 34, 0}}));
  ASSERT_EQ(test::run_rwkvx(dir, {"data", "--input", input, "--out", dir.file("e2"), "--vocab", vocab, "--epochs", "2"}).status, 0);
  std::vector<std::vector<int32_t>> twice = expect;
  twice.insert(twice.end(), expect.begin(), expect.end());
  EXPECT_EQ(items(dir.file("e2")), twice);
  for (const char* name : {"s1", "s2"})
    ASSERT_EQ(test::run_rwkvx(dir, {"data", "--input", input, "--out", dir.file(name), "--vocab", vocab, "--epochs",
                                    "2", "--shuffle", "--seed", "9"}).status, 0);
  std::vector<std::vector<int32_t>> s1 = items(dir.file("s1")), sorted_twice = twice;
  EXPECT_EQ(s1, items(dir.file("s2")));
  EXPECT_NE(s1, twice);
  std::sort(s1.begin(), s1.end());
  std::sort(sorted_twice.begin(), sorted_twice.end());
  EXPECT_EQ(s1, sorted_twice);
}

TEST(DataCli, PlainTextSplits) {
  test::TempDir dir;
  const Tokenizer tok = Tokenizer::load(vocab);
  const std::string text = "First line.\r\nSecond line\n\n\n  \nThird para\nstill third\n";
  const std::string input = dir.write("t.txt", text);
  auto doc = [&](const std::string& s) {
    std::vector<int32_t> ids = tok.encode(s);
    ids.push_back(0);
    return ids;
  };
  const std::vector<std::pair<std::string, std::vector<std::vector<int32_t>>>> cases = {
      {"file", {doc(text)}},
      {"line", {doc("First line."), doc("Second line"), doc("Third para"), doc("still third")}},
      {"blank", {doc("First line.\nSecond line"), doc("Third para\nstill third")}},
  };
  for (const auto& [split, expect] : cases) {
    const std::string out = dir.file("t_" + split);
    test::CliResult r = test::run_rwkvx(dir, {"data", "--input", input, "--out", out, "--vocab", vocab, "--text-split", split});
    ASSERT_EQ(r.status, 0) << split << ": " << r.stderr_text;
    EXPECT_EQ(items(out), expect) << split;
  }
  // Several inputs, in order, mixing formats.
  const std::string j = dir.write("a.jsonl", "{\"text\": \"A\"}\n");
  ASSERT_EQ(test::run_rwkvx(dir, {"data", "--input", j, "--input", input, "--out", dir.file("mix"), "--vocab", vocab}).status, 0);
  EXPECT_EQ(items(dir.file("mix")), (std::vector<std::vector<int32_t>>{doc("A"), doc(text)}));
}

struct BadCase {
  std::string what;
  std::vector<std::string> args;
  std::string expect;  // in stderr
};

TEST(DataCli, BadInputsExitNonZeroNamingTheProblem) {
  test::TempDir dir;
  const std::string ok = dir.write("ok.jsonl", "{\"text\": \"hi\"}\n");
  const std::string out = dir.file("o");
  auto jsonl = [&](const std::string& name, const std::string& body) { return dir.write(name, body); };
  const std::vector<BadCase> cases = {
      {"missing field", {"--input", jsonl("m.jsonl", "{\"text\": \"a\"}\n{\"txt\": \"b\"}\n")}, "m.jsonl:2: no \"text\" field"},
      {"not a string", {"--input", jsonl("n.jsonl", "{\"text\": [1]}\n")}, "n.jsonl:1: field \"text\" is a array"},
      {"invalid json", {"--input", jsonl("i.jsonl", "\n{\"text\": \"a\"\n")}, "i.jsonl:2: invalid JSON"},
      {"not an object", {"--input", jsonl("o.jsonl", "[\"text\"]\n")}, "o.jsonl:1: expected a JSON object"},
      {"bad utf-8 in json", {"--input", jsonl("u.jsonl", "{\"text\": \"\xff\"}\n")}, "u.jsonl:1: invalid JSON"},
      {"bad utf-8 in text", {"--input", jsonl("u.txt", "fine\nbad \xc3\x28\n")}, "u.txt:2: not valid UTF-8"},
      {"unknown extension", {"--input", jsonl("x.csv", "a,b\n")}, "x.csv: cannot tell the format"},
      {"missing input", {"--input", dir.file("nope.jsonl")}, "nope.jsonl"},
      {"bad split", {"--input", ok, "--text-split", "words"}, "--text-split 'words'"},
      {"bad vocab", {"--input", ok, "--vocab", dir.file("novocab.txt")}, "novocab.txt"},
      {"zero epochs", {"--input", ok, "--epochs", "0"}, "--epochs"},
  };
  for (const BadCase& c : cases) {
    std::vector<std::string> args = {"data"};
    args.insert(args.end(), c.args.begin(), c.args.end());
    args.insert(args.end(), {"--out", out});
    if (std::find(c.args.begin(), c.args.end(), "--vocab") == c.args.end()) args.insert(args.end(), {"--vocab", vocab});
    test::CliResult r = test::run_rwkvx(dir, args);
    EXPECT_NE(r.status, 0) << c.what;
    EXPECT_NE(r.stderr_text.find(c.expect), std::string::npos) << c.what << ": " << r.stderr_text;
    EXPECT_FALSE(std::filesystem::exists(out + ".bin")) << c.what;
    EXPECT_FALSE(std::filesystem::exists(out + ".idx")) << c.what;
  }
  test::CliResult r = test::run_rwkvx(dir, {"data", "--input", ok, "--out", dir.file("o.bin"), "--vocab", vocab});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.stderr_text.find("give the prefix"), std::string::npos) << r.stderr_text;
  r = test::run_rwkvx(dir, {"data", "--out", out});
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.stderr_text.find("--input"), std::string::npos) << r.stderr_text;
}

TEST(ExpandCli, WritesALoadableRwkvxAndRefusesBadRequests) {
  test::TempDir dir;
  const std::string src = test::golden_dir("rwkv7-tiny") + "/model.pth";
  const std::string out = dir.file("x.pth");
  test::CliResult r = test::run_rwkvx(dir, {"expand", "--model", src, "--out", out, "--sparse-layers", "1,3"});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  EXPECT_NE(r.stdout_text.find("2 sparse-attention blocks (after RWKV blocks 1, 3), init paper"), std::string::npos)
      << r.stdout_text;
  r = test::run_rwkvx(dir, {"info", "--model", out});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  EXPECT_NE(r.stdout_text.find("R0 R1 M0 R2 R3 M1"), std::string::npos) << r.stdout_text;
  // Default count for 4 RWKV blocks: one per 4.
  r = test::run_rwkvx(dir, {"expand", "--model", src, "--out", dir.file("d.safetensors"), "--init", "official"});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  EXPECT_NE(r.stdout_text.find("1 sparse-attention blocks (after RWKV blocks 3), init official"), std::string::npos)
      << r.stdout_text;

  const std::vector<BadCase> cases = {
      {"bad init", {"--model", src, "--out", dir.file("a.pth"), "--init", "zero"}, "unknown --init 'zero'"},
      {"bad count", {"--model", src, "--out", dir.file("a.pth"), "--sparse-layers", "3"}, "does not divide"},
      {"bad list", {"--model", src, "--out", dir.file("a.pth"), "--sparse-layers", "0,3"}, "after RWKV blocks 1,3"},
      {"bad extension", {"--model", src, "--out", dir.file("a.bin")}, "unknown checkpoint extension"},
      {"same file", {"--model", out, "--out", out}, "is the input model"},
      {"rwkv-x input", {"--model", test::golden_dir("rwkvx-tiny") + "/model.pth", "--out", dir.file("a.pth")},
       "already an RWKV-X"},
      {"missing model", {"--model", dir.file("none.pth"), "--out", dir.file("a.pth")}, "none.pth"},
      {"not a model", {"--model", dir.write("junk.pth", "junk"), "--out", dir.file("a.pth")}, "junk.pth"},
  };
  for (const BadCase& c : cases) {
    std::vector<std::string> args = {"expand"};
    args.insert(args.end(), c.args.begin(), c.args.end());
    test::CliResult res = test::run_rwkvx(dir, args);
    EXPECT_NE(res.status, 0) << c.what;
    EXPECT_NE(res.stderr_text.find(c.expect), std::string::npos) << c.what << ": " << res.stderr_text;
  }
  EXPECT_FALSE(std::filesystem::exists(dir.file("a.pth")));
}

// `rwkvx grad` on a golden case: one f32 gradient per checkpoint tensor, equal to the trainer's (the file is
// what scripts/peers/official_grads.py compares with the official trainer's autograd); bad token files exit 1.
TEST(GradCli, WritesTheTrainersGradients) {
  test::TempDir dir;
  const std::string gdir = test::golden_dir("rwkvx-tiny");
  const test::CliResult r = test::run_rwkvx(
      dir, {"grad", "--model", gdir + "/model.safetensors", "--tokens-json", gdir + "/case.json", "--out", dir.file("g.safetensors")});
  ASSERT_EQ(r.status, 0) << r.stderr_text;
  EXPECT_NE(r.stdout_text.find("159 positions"), std::string::npos) << r.stdout_text;
  const TensorStore g = load_checkpoint(dir.file("g.safetensors"));
  nlohmann::json cas = nlohmann::json::parse(std::ifstream(gdir + "/case.json"));
  const std::vector<int32_t> tok = cas["tokens"].get<std::vector<int32_t>>();
  ModelOptions mo;
  mo.chunk = cas["config"]["chunk"].get<int>();
  mo.top_k = cas["config"]["topk"].get<int>();
  train::TrainModel m = train::TrainModel::load(gdir + "/model.safetensors", mo);
  train::LossOptions lo;
  lo.pad_multiple = 0;
  m.zero_grad();
  m.forward_backward(tok.data(), tok.data() + 1, int64_t(tok.size()) - 1, lo);
  ASSERT_EQ(g.tensors.size(), m.n_params());
  for (size_t i = 0; i < m.n_params(); ++i) {
    const StoredTensor* t = g.find(m.param(i).name);
    ASSERT_NE(t, nullptr) << m.param(i).name;
    EXPECT_EQ(t->to_f32(), m.grad(i)) << m.param(i).name;
  }
  dir.write("bad.json", R"({"tokens": [1, "two", 3]})");
  const test::CliResult bad =
      test::run_rwkvx(dir, {"grad", "--model", gdir + "/model.safetensors", "--tokens-json", dir.file("bad.json"),
                            "--out", dir.file("b.safetensors")});
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.stderr_text.find("bad.json"), std::string::npos) << bad.stderr_text;
  EXPECT_FALSE(std::filesystem::exists(dir.file("b.safetensors")));
}

}  // namespace
}  // namespace rwkvx
