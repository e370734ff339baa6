// Runs the real rwkvx binary (RWKVX_BINARY) through the shell and captures its output, for tests of
// the command-line tools; plus temporary directories and model files for them.
#pragma once
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "model/formats/safetensors_writer.h"
#include "model/random_init.h"

namespace rwkvx::test {

struct CliResult {
  int status = -1;     // exit status; -1 when killed by a signal
  std::string stdout_text, stderr_text;
};

inline std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

class TempDir {
 public:
  TempDir() {
    std::string t = (std::filesystem::temp_directory_path() / "rwkvx_test_XXXXXX").string();
    if (!mkdtemp(t.data())) std::abort();
    path_ = t;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (std::filesystem::path(path_) / name).string(); }
  std::string write(const std::string& name, const std::string& content) const {
    std::ofstream(file(name), std::ios::binary) << content;
    return file(name);
  }

 private:
  std::string path_;
};

inline std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// `args` are quoted one by one; `stdin_file` (optional) is redirected to the command's stdin. The binary is
// the one built beside the tests, or $RWKVX_TEST_BINARY (running a copied test binary on another machine).
inline CliResult run_rwkvx(const TempDir& dir, const std::vector<std::string>& args, const std::string& stdin_file = "") {
  const char* bin = std::getenv("RWKVX_TEST_BINARY");
  std::string cmd = shell_quote(bin && *bin ? bin : RWKVX_BINARY);
  for (const std::string& a : args) cmd += " " + shell_quote(a);
  const std::string out = dir.file("cli.stdout"), err = dir.file("cli.stderr");
  cmd += " >" + shell_quote(out) + " 2>" + shell_quote(err);
  cmd += " <" + shell_quote(stdin_file.empty() ? std::string("/dev/null") : stdin_file);
  const int rc = std::system(cmd.c_str());
  CliResult r;
  r.status = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  r.stdout_text = read_text(out);
  r.stderr_text = read_text(err);
  return r;
}

inline std::string write_random_model(const TempDir& dir, const std::string& name, const RandomModelSpec& spec) {
  const std::string path = dir.file(name);
  save_safetensors(path, make_random_model(spec));
  return path;
}

}  // namespace rwkvx::test
