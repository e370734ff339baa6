// Helpers for the eval tests: the golden models (vocab 300, chunk 16, top-k 3) and a byte-level vocabulary
// that fits them (ids 1..256 are the single bytes 0..255, as in the World vocab, so '\n' is 11; ids
// 257..299 are a few multi-byte words of the passkey prompt, so greedy merges are exercised too).
#pragma once
#include <cstdio>
#include <memory>
#include <string>

#include "backend/cpu/cpu_backend.h"
#include "model/model.h"
#include "runtime/tokenizer.h"
#include "support/random_model.h"
#include "support/run_cli.h"
#include "support/test_util.h"

namespace rwkvx::test {

inline std::string small_vocab_text() {
  static const char* words[] = {"The", " the", "pass", " pass", " key", " is", "grass", " green", " sky", " blue",
                                " sun", " yellow", "Here", " we", " go", "There", " and", " back", " again",
                                " important", " info", " hidden", " text", "What", " What", " Remember", " it",
                                "ass", "ee", "ck", "in", "an", "er", "re", "on", "at", "en", "is", "or", "ll", "ow",
                                "ey", " "};
  std::string text;
  auto line = [&](int id, const std::string& bytes) {
    std::string lit = "b'";
    char buf[8];
    for (unsigned char c : bytes) std::snprintf(buf, sizeof buf, "\\x%02x", c), lit += buf;
    text += std::to_string(id) + " " + lit + "' " + std::to_string(bytes.size()) + "\n";
  };
  for (int b = 0; b < 256; ++b) line(b + 1, std::string(1, char(b)));
  int id = 257;
  for (const char* w : words)
    if (std::string(w).size() > 1 && id < 300) line(id++, w);
  return text;
}

inline Tokenizer small_tokenizer() { return Tokenizer::parse(small_vocab_text(), "small-vocab"); }

inline std::string golden_model_path(const std::string& name) { return golden_dir(name) + "/model.safetensors"; }

inline ModelOptions golden_options() {
  ModelOptions o;
  o.chunk = 16;
  o.top_k = 3;
  return o;
}

struct GoldenModel {
  std::unique_ptr<Backend> be;
  std::unique_ptr<Model> model;
};

inline GoldenModel load_golden(const std::string& name) {
  GoldenModel g;
  g.be = make_cpu_backend(CpuBackendOptions{});
  g.model = Model::load(golden_model_path(name), golden_options(), *g.be);
  return g;
}

// The CLI options that load a golden model with its own chunk size and top-k.
inline std::vector<std::string> golden_cli_args(const std::string& name) {
  return {"--model", golden_model_path(name), "--chunk-size", "16", "--top-k", "3"};
}

}  // namespace rwkvx::test
