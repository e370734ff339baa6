// libFuzzer target for the vocab parser and the encoder (spec §1.1–§1.3, src/runtime/tokenizer.cpp).
// Each input is parsed twice: alone, and appended to the 256 single-byte lines (so that extra tokens
// parse and the encoder runs). A parsed vocab must encode the input, round-trip it through decode_bytes
// and agree with a brute-force longest match. Only rwkvx::Error may escape the parser.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "runtime/tokenizer.h"

namespace {

// Lines 1..256 of the World vocab: id = byte + 1, in the file's own spelling.
const std::string& single_byte_lines() {
  static const std::string lines = [] {
    static const char* hex = "0123456789abcdef";
    std::string v;
    for (int b = 0; b < 256; ++b) {
      std::string lit;
      if (b == '\\') lit = "'\\\\'";
      else if (b == '\'') lit = "\"'\"";
      else if (b >= 0x20 && b < 0x7f) lit = std::string("'") + char(b) + "'";
      else lit = std::string(b >= 0x80 ? "b'" : "'") + "\\x" + hex[b >> 4] + hex[b & 15] + "'";
      v += std::to_string(b + 1) + " " + lit + " 1\n";
    }
    return v;
  }();
  return lines;
}

// Reference encoder: probe every length from the longest down at each position.
std::vector<int32_t> brute_force_encode(const rwkvx::Tokenizer& tok, std::string_view s) {
  std::unordered_map<std::string_view, int32_t> by_bytes;
  for (size_t id = 1; id < tok.vocab_size(); ++id) {
    if (tok.has_token(int32_t(id))) by_bytes.emplace(tok.token_bytes(int32_t(id)), int32_t(id));
  }
  std::vector<int32_t> out;
  size_t i = 0;
  while (i < s.size()) {
    size_t len = std::min(tok.max_token_len(), s.size() - i);
    for (; len > 0; --len) {
      auto it = by_bytes.find(s.substr(i, len));
      if (it != by_bytes.end()) {
        out.push_back(it->second);
        break;
      }
    }
    if (len == 0) std::abort();  // parse guarantees every single byte is a token
    i += len;
  }
  return out;
}

void check_tokenizer(const rwkvx::Tokenizer& tok, std::string_view input) {
  const std::vector<int32_t> ids = tok.encode(input);
  for (const int32_t id : ids) {
    if (id <= 0 || !tok.has_token(id)) std::abort();
  }
  if (tok.decode_bytes(ids) != input) std::abort();
  if (ids != brute_force_encode(tok, input)) std::abort();
  const std::string compat = tok.decode_compat(ids);
  if (rwkvx::is_valid_utf8(input) ? compat != input : compat != "\xEF\xBF\xBD") std::abort();

  // Arbitrary id sequences: decode_bytes may only throw rwkvx::Error, decode_compat never throws.
  std::vector<int32_t> raw_ids;
  for (size_t i = 0; i + 1 < input.size() && raw_ids.size() < 64; i += 2) {
    raw_ids.push_back(int32_t(uint8_t(input[i])) | (int32_t(uint8_t(input[i + 1])) << 8));
  }
  try {
    (void)tok.decode_bytes(raw_ids);
  } catch (const rwkvx::Error&) {
  }
  (void)tok.decode_compat(raw_ids);
}

// Parses `text`; a parse failure must be an rwkvx::Error (anything else escapes and is reported).
std::optional<rwkvx::Tokenizer> try_parse(const std::string_view text) {
  try {
    return rwkvx::Tokenizer::parse(text, "fuzz.txt");
  } catch (const rwkvx::Error&) {
    return std::nullopt;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  // Checks run outside the try blocks, so an rwkvx::Error from encode/decode is not mistaken for a
  // parse failure: it escapes and libFuzzer reports it.
  if (auto tok = try_parse(input)) check_tokenizer(*tok, input);
  if (auto tok = try_parse(single_byte_lines() + std::string(input))) check_tokenizer(*tok, input);
  return 0;
}
