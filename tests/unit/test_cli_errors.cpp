// The rwkvx CLI on bad input: one line "error: ..." naming the file and the token/field at fault, a
// non-zero exit status, no crash, and no half-written --out file. Runs the real binary (RWKVX_BINARY)
// with stdout and stderr captured into a temp file.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "support/test_util.h"

namespace rwkvx {
namespace {

namespace fs = std::filesystem;

struct RunResult {
  int status = -1;  // exit status; -1 when killed by a signal (a crash)
  std::string output;
};

class CliErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "rwkvx_cli_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::string path(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  std::string write(const std::string& name, const std::string& content) const {
    std::string p = path(name);
    std::ofstream(p, std::ios::binary) << content;
    return p;
  }

  static std::string quote(const std::string& s) {
    std::string q = "'";
    for (char c : s) {
      if (c == '\'') q += "'\\''";
      else q.push_back(c);
    }
    q.push_back('\'');
    return q;
  }

  // `env`: assignments put before the command, e.g. "RWKVX_ISA=avx2".
  RunResult run(const std::vector<std::string>& args, const std::string& env = "") const {
    std::string cmd = (env.empty() ? "" : env + " ") + quote(RWKVX_BINARY);
    for (const std::string& a : args) cmd.append(" ").append(quote(a));
    const std::string log = path("log.txt");
    cmd.append(" > ").append(quote(log)).append(" 2>&1 < /dev/null");
    const int rc = std::system(cmd.c_str());
    RunResult r;
    r.status = rc != -1 && WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
    std::ifstream in(log, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    r.output = ss.str();
    return r;
  }

  // Non-zero exit, exactly one line starting with "error:", mentioning each of `parts`.
  static void expect_one_line_error(const RunResult& r, std::initializer_list<std::string> parts) {
    EXPECT_GT(r.status, 0) << r.output;
    EXPECT_EQ(r.output.rfind("error: ", 0), 0u) << r.output;
    ASSERT_FALSE(r.output.empty());
    EXPECT_EQ(r.output.back(), '\n') << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
    for (const std::string& p : parts) EXPECT_NE(r.output.find(p), std::string::npos) << "'" << p << "' not in: " << r.output;
  }

  // No output file and no leftover temp file of the atomic write.
  void expect_no_out_file(const std::string& out) const {
    EXPECT_FALSE(fs::exists(out)) << out;
    for (const auto& e : fs::directory_iterator(dir_))
      EXPECT_EQ(e.path().filename().string().find("out.f32.tmp"), std::string::npos) << e.path();
  }

  static std::string model(const std::string& cs = "rwkvx-tiny", const std::string& ext = "safetensors") {
    return test::golden_dir(cs) + "/model." + ext;
  }

  RunResult logits(const std::string& model_path, const std::string& tokens, const std::string& out,
                   std::vector<std::string> extra = {}) const {
    std::vector<std::string> args = {"logits", "--model", model_path, "--tokens-file", tokens, "--out", out};
    args.insert(args.end(), extra.begin(), extra.end());
    return run(args);
  }

  std::string dir_;
};

TEST_F(CliErrors, TokenIdOutsideVocabulary) {
  const std::string tokens = write("tokens.txt", "1 2 299\n300 5\n");
  const std::string out = path("out.f32");
  RunResult r = logits(model(), tokens, out);
  expect_one_line_error(r, {tokens, "token 3", "id 300", "[0, 300)"});
  expect_no_out_file(out);
}

TEST_F(CliErrors, UnknownInstructionSetInEnvironment) {
  const std::string tokens = write("tokens.txt", "1 2 3");
  const std::string out = path("out.f32");
  RunResult r = run({"logits", "--model", model(), "--tokens-file", tokens, "--out", out}, "RWKVX_ISA=bogus");
  expect_one_line_error(r, {"RWKVX_ISA", "'bogus'", "avx512"});
  expect_no_out_file(out);
}

TEST_F(CliErrors, TokenIdOutsideVocabularyPth) {
  const std::string tokens = write("tokens.txt", "7 123456");
  const std::string out = path("out.f32");
  RunResult r = logits(model("rwkv7-tiny", "pth"), tokens, out);
  expect_one_line_error(r, {tokens, "token 1", "id 123456"});
  expect_no_out_file(out);
}

TEST_F(CliErrors, EmptyTokenFile) {
  for (const char* content : {"", "  \n\t\n"}) {
    const std::string tokens = write("empty.txt", content);
    const std::string out = path("out.f32");
    RunResult r = logits(model(), tokens, out);
    expect_one_line_error(r, {tokens, "empty"});
    expect_no_out_file(out);
  }
}

TEST_F(CliErrors, NonIntegerToken) {
  const std::string out = path("out.f32");
  for (const auto& [content, want] : std::vector<std::pair<std::string, std::string>>{
           {"1 abc 3", "token 1 ('abc')"},
           {"1 2 3.5", "token 2 ('3.5')"},
           {"-4", "token 0 ('-4')"},
           {"5 99999999999999999999", "token 1"},
           {"[1, 2]", "token 0"}}) {
    SCOPED_TRACE(content);
    const std::string tokens = write("bad_tokens.txt", content);
    RunResult r = logits(model(), tokens, out);
    expect_one_line_error(r, {tokens, want, "not a non-negative integer id"});
    expect_no_out_file(out);
  }
}

TEST_F(CliErrors, MissingTokenFile) {
  const std::string out = path("out.f32");
  RunResult r = logits(model(), path("nope.txt"), out);
  expect_one_line_error(r, {path("nope.txt")});
  expect_no_out_file(out);
}

TEST_F(CliErrors, MissingModelFile) {
  const std::string tokens = write("tokens.txt", "1 2 3");
  const std::string out = path("out.f32");
  const std::string missing = path("no_such_model.pth");
  RunResult r = logits(missing, tokens, out);
  expect_one_line_error(r, {missing, "cannot open"});
  expect_no_out_file(out);
  r = run({"info", "--model", missing});
  expect_one_line_error(r, {missing, "cannot open"});
}

TEST_F(CliErrors, ModelIsADirectory) {
  const std::string tokens = write("tokens.txt", "1 2 3");
  const std::string out = path("out.f32");
  RunResult r = logits(dir_, tokens, out);
  expect_one_line_error(r, {dir_});
  expect_no_out_file(out);
}

std::string read_file(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST_F(CliErrors, CorruptModelFile) {
  const std::string tokens = write("tokens.txt", "1 2 3");
  const std::string out = path("out.f32");
  const std::string pth = read_file(model("rwkvx-tiny", "pth"));
  const std::string st = read_file(model("rwkvx-tiny", "safetensors"));
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"truncated.pth", pth.substr(0, pth.size() / 2)},
      {"cut_end.pth", pth.substr(0, pth.size() - 1)},
      {"truncated.safetensors", st.substr(0, st.size() - 100)},
      {"garbage.bin", std::string(1000, 'x')},
      {"empty.pth", ""},
  };
  for (const auto& [name, bytes] : cases) {
    SCOPED_TRACE(name);
    const std::string m = write(name, bytes);
    RunResult r = logits(m, tokens, out);
    expect_one_line_error(r, {m});
    expect_no_out_file(out);
    r = run({"info", "--model", m});
    expect_one_line_error(r, {m});
  }
}

TEST_F(CliErrors, CorruptModelNamesTheTensor) {
  // Flip BF16 -> F32 for one tensor in the header: the byte range no longer matches.
  std::string st = read_file(model("rwkvx-tiny", "safetensors"));
  const std::string key = "\"rwkv.ln_out.bias\":{\"dtype\":\"BF16\"";
  size_t at = st.find(key);
  ASSERT_NE(at, std::string::npos);
  st.replace(at + key.size() - 5, 4, "F16 ");  // still bf16-sized, but not a dtype we know: "F16 "
  const std::string m = write("dtype.safetensors", st);
  RunResult r = run({"info", "--model", m});
  expect_one_line_error(r, {m, "tensor 'rwkv.ln_out.bias'", "unsupported dtype 'F16 '"});
}

TEST_F(CliErrors, InvalidModeAndOptions) {
  const std::string tokens = write("tokens.txt", "1 2 3");
  const std::string out = path("out.f32");
  // CLI11 parse errors may print usage: only the exit status and the absent output are checked.
  for (const std::vector<std::string>& extra : std::vector<std::vector<std::string>>{
           {"--mode", "sideways"}, {"--slice", "0"}, {"--chunk-size", "abc"}, {"--bogus-flag"}}) {
    SCOPED_TRACE(extra[0]);
    RunResult r = logits(model(), tokens, out, extra);
    EXPECT_GT(r.status, 0) << r.output;
    expect_no_out_file(out);
  }
  RunResult r = run({"logits", "--model", model(), "--out", out});  // --tokens-file missing
  EXPECT_GT(r.status, 0) << r.output;
  expect_no_out_file(out);
  r = run({"no-such-command"});
  EXPECT_GT(r.status, 0) << r.output;
  r = run({});
  EXPECT_GT(r.status, 0) << r.output;
}

TEST_F(CliErrors, InvalidLoadOptionsAreOneLineErrors) {
  const std::string tokens = write("tokens.txt", "1 2 3");
  const std::string out = path("out.f32");
  RunResult r = logits(model(), tokens, out, {"--top-k", "0"});
  expect_one_line_error(r, {"--top-k"});
  expect_no_out_file(out);
}

TEST_F(CliErrors, ValidRunWritesTimesVocabFloats) {
  const std::string tokens = write("tokens.txt", "63 103 22 177 193\n86 219");
  for (const char* mode : {"prefill", "decode"}) {
    SCOPED_TRACE(mode);
    const std::string out = path(std::string("valid_") + mode + ".f32");
    RunResult r = logits(model(), tokens, out, {"--mode", mode, "--chunk-size", "16", "--top-k", "3"});
    EXPECT_EQ(r.status, 0) << r.output;
    ASSERT_TRUE(fs::exists(out));
    EXPECT_EQ(fs::file_size(out), uintmax_t(7) * 300 * 4);
  }
  // The two modes agree closely (same model, same tokens).
  std::vector<float> a = test::read_f32_file(path("valid_prefill.f32")), b = test::read_f32_file(path("valid_decode.f32"));
  EXPECT_LT(test::rel_max_err(a, b), 1e-4);
}

TEST_F(CliErrors, FailedRunLeavesExistingOutputUntouched) {
  const std::string out = write("out.f32", "previous contents");
  const std::string tokens = write("tokens.txt", "1 2 300");
  RunResult r = logits(model(), tokens, out);
  expect_one_line_error(r, {"token 2", "id 300"});
  EXPECT_EQ(read_file(out), "previous contents");
}

TEST_F(CliErrors, HelpExitsZeroForEverySubcommand) {
  for (const char* cmd : {"logits", "info", "tokenize", "detokenize"}) {
    SCOPED_TRACE(cmd);
    RunResult r = run({cmd, "--help"});
    EXPECT_EQ(r.status, 0) << r.output;
    EXPECT_NE(r.output.find(cmd), std::string::npos) << r.output;
  }
  RunResult r = run({"--help"});
  EXPECT_EQ(r.status, 0) << r.output;
}

}  // namespace
}  // namespace rwkvx
