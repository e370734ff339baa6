// `rwkvx tokenize` and `rwkvx detokenize`: the World tokenizer (spec §1) on stdin/stdout, binary-safe.
// tokenize: all of stdin as raw bytes -> one line with a JSON array of ids. detokenize: a JSON array (or
// whitespace-separated ids) on stdin -> the raw bytes of decode_bytes on stdout. Errors throw rwkvx::Error,
// which main() prints as "error: ..." before exiting with status 1.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "commands.h"
#include "core/error.h"
#include "runtime/tokenizer.h"

namespace {

std::string read_all_stdin() {
  std::string data;
  char buf[1 << 16];
  for (;;) {
    const size_t n = std::fread(buf, 1, sizeof buf, stdin);
    data.append(buf, n);
    if (n < sizeof buf) {
      if (std::ferror(stdin)) throw rwkvx::Error(std::string("stdin: read failed: ") + std::strerror(errno));
      break;
    }
  }
  return data;
}

void write_stdout(std::string_view bytes) {
  if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), stdout) != bytes.size()) {
    throw rwkvx::Error(std::string("stdout: write failed: ") + std::strerror(errno));
  }
  if (std::fflush(stdout) != 0) throw rwkvx::Error(std::string("stdout: write failed: ") + std::strerror(errno));
}

std::string resolve_vocab(const std::string& given) {
  return given.empty() ? rwkvx::default_vocab_path() : given;
}

int32_t checked_id(int64_t v, size_t index, const std::string& text) {
  if (v < INT32_MIN || v > INT32_MAX) {
    throw rwkvx::Error("stdin: id " + text + " at index " + std::to_string(index) + " is out of range");
  }
  return int32_t(v);
}

// A JSON array of integers, or integers separated by whitespace.
std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  const size_t start = text.find_first_not_of(" \t\r\n");
  if (start == std::string::npos) return ids;
  if (text[start] == '[') {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      throw rwkvx::Error(std::string("stdin: invalid JSON: ") + e.what());
    }
    if (!j.is_array()) throw rwkvx::Error("stdin: expected a JSON array of token ids");
    for (size_t i = 0; i < j.size(); ++i) {
      const auto& v = j[i];
      if (v.is_number_unsigned()) {
        const auto u = v.get<uint64_t>();
        if (u > uint64_t(INT32_MAX)) {
          throw rwkvx::Error("stdin: id " + v.dump() + " at index " + std::to_string(i) + " is out of range");
        }
        ids.push_back(int32_t(u));
      } else if (v.is_number_integer()) {
        ids.push_back(checked_id(v.get<int64_t>(), i, v.dump()));
      } else {
        throw rwkvx::Error("stdin: element " + std::to_string(i) + " (" + v.dump() + ") is not an integer token id");
      }
    }
    return ids;
  }
  size_t pos = start;
  while (pos < text.size()) {
    const size_t end = std::min(text.find_first_of(" \t\r\n", pos), text.size());
    const std::string word = text.substr(pos, end - pos);
    int64_t v = 0;
    const auto [ptr, ec] = std::from_chars(word.data(), word.data() + word.size(), v);
    if (ec != std::errc() || ptr != word.data() + word.size()) {
      throw rwkvx::Error("stdin: token " + std::to_string(ids.size()) + " '" + word.substr(0, 40) +
                         "' is not an integer id (expected a JSON array or whitespace-separated ids)");
    }
    ids.push_back(checked_id(v, ids.size(), word));
    pos = text.find_first_not_of(" \t\r\n", end);
    if (pos == std::string::npos) break;
  }
  return ids;
}

std::string ids_to_json(const std::vector<int32_t>& ids) {
  std::string out = "[";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(ids[i]);
  }
  out += "]\n";
  return out;
}

const char* vocab_help =
    "vocab file (default: $RWKVX_VOCAB, else data/rwkv_vocab_v20230424.txt next to the installed binary "
    "or in the source tree)";

}  // namespace

void register_tokenize_commands(CLI::App& app) {
  {
    auto vocab = std::make_shared<std::string>();
    CLI::App* cmd = app.add_subcommand("tokenize");
    cmd->description("Encode stdin (raw bytes) with the RWKV World tokenizer; print a JSON array of ids");
    cmd->footer(
        "Encode all of stdin, read as raw bytes (any bytes, not only UTF-8), with greedy longest match over the "
        "RWKV World vocab, and print the ids as one JSON array on one line, e.g. [33155, 40213, 34].");
    cmd->add_option("--vocab", *vocab, vocab_help);
    cmd->callback([vocab] {
      const auto tok = rwkvx::Tokenizer::load(resolve_vocab(*vocab));
      write_stdout(ids_to_json(tok.encode(read_all_stdin())));
    });
  }
  {
    auto vocab = std::make_shared<std::string>();
    CLI::App* cmd = app.add_subcommand("detokenize");
    cmd->description("Decode token ids (JSON array or whitespace-separated) from stdin to raw bytes on stdout");
    cmd->footer(
        "Read token ids from stdin, as a JSON array or whitespace-separated integers, and write the "
        "concatenation of their bytes to stdout unchanged (binary-safe; id 0 = end of doc adds nothing). An "
        "id not in the vocab is an error.");
    cmd->add_option("--vocab", *vocab, vocab_help);
    cmd->callback([vocab] {
      const auto tok = rwkvx::Tokenizer::load(resolve_vocab(*vocab));
      write_stdout(tok.decode_bytes(parse_ids(read_all_stdin())));
    });
  }
}
