// RWKV "World" tokenizer: vocab parsing (python str/bytes repr literals), trie construction, greedy
// longest-match encoding and decoding. Implements spec §1.1–§1.3 (system.md); also default_vocab_path().
// The parser is strict and total: every malformed input ends in rwkvx::Error("<file>:<line>: ..."),
// never in a crash, so it can be fuzzed (fuzz/fuzz_vocab.cpp).
#include "runtime/tokenizer.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <system_error>

#include "core/error.h"
#include "core/mapped_file.h"

namespace rwkvx {

namespace {

// Nodes with at least this many children get a 256-entry lookup table; smaller ones scan their labels.
// With 8 the World vocab (116k nodes) needs 1362 tables (1.3 MB); thresholds 4..16 measured the same
// (~80 MB/s of English text on a 2-core EPYC), so 8 keeps memory moderate.
constexpr uint32_t dense_min_children = 8;

// Length of the valid UTF-8 sequence starting at p (strict, as Python's codec), or 0 if invalid/truncated.
size_t utf8_seq_len(const uint8_t* p, size_t n) {
  uint8_t c = p[0];
  if (c < 0x80) return 1;
  if (c < 0xC2) return 0;  // continuation byte or overlong 2-byte lead
  if (c < 0xE0) return (n >= 2 && (p[1] & 0xC0) == 0x80) ? 2 : 0;
  if (c < 0xF0) {
    if (n < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
    if (c == 0xE0 && p[1] < 0xA0) return 0;   // overlong
    if (c == 0xED && p[1] >= 0xA0) return 0;  // surrogates U+D800..U+DFFF
    return 3;
  }
  if (c < 0xF5) {
    if (n < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return 0;
    if (c == 0xF0 && p[1] < 0x90) return 0;   // overlong
    if (c == 0xF4 && p[1] >= 0x90) return 0;  // above U+10FFFF
    return 4;
  }
  return 0;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(char(cp));
  } else if (cp < 0x800) {
    out.push_back(char(0xC0 | (cp >> 6)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(char(0xE0 | (cp >> 12)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(char(0xF0 | (cp >> 18)));
    out.push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  }
}

// A printable, bounded excerpt of untrusted text for error messages (non-printable bytes as \xHH).
std::string excerpt(std::string_view s, size_t max_len = 60) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < s.size() && i < max_len; ++i) {
    auto c = uint8_t(s[i]);
    if (c >= 0x20 && c < 0x7F) {
      out.push_back(char(c));
    } else {
      out += "\\x";
      out.push_back(hex[c >> 4]);
      out.push_back(hex[c & 15]);
    }
  }
  if (s.size() > max_len) out += "...";
  return out;
}

std::string byte_hex(uint8_t b) {
  static const char* hex = "0123456789abcdef";
  return std::string("0x") + hex[b >> 4] + hex[b & 15];
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Parses a decimal field (digits only: no sign, no spaces); returns -1 if it is not one. Values above
// 10^12 saturate there, which every caller rejects as out of range or mismatched.
int64_t parse_decimal(std::string_view s) {
  if (s.empty()) return -1;
  constexpr int64_t cap = 1000000000000;
  int64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return -1;
    v = std::min(cap, v * 10 + (c - '0'));
  }
  return v;
}

[[noreturn]] void literal_error(std::string_view lit, const std::string& where, const std::string& what) {
  throw Error(where + "malformed literal " + excerpt(lit) + ": " + what);
}

// Decodes one python str/bytes repr literal (spec §1.1) into `out`. Throws with `where` ("file:line: ")
// as the message prefix.
void parse_literal(std::string_view lit, const std::string& where, std::string& out) {
  out.clear();
  auto fail = [&](const std::string& what) { literal_error(lit, where, what); };
  size_t pos = 0;
  bool is_bytes = false;
  if (!lit.empty() && lit[0] == 'b') {
    is_bytes = true;
    pos = 1;
  }
  if (pos >= lit.size() || (lit[pos] != '\'' && lit[pos] != '"')) {
    fail("expected a python str or bytes repr ('...', \"...\", b'...' or b\"...\")");
  }
  const char quote = lit[pos++];
  for (;;) {
    if (pos >= lit.size()) fail("unterminated quote (no closing " + std::string(1, quote) + ")");
    const auto c = uint8_t(lit[pos]);
    if (c == uint8_t(quote)) {
      if (pos + 1 != lit.size()) {
        fail("unescaped " + std::string(1, quote) + " at column " + std::to_string(pos + 1) +
             " (text after the closing quote)");
      }
      break;
    }
    if (c == '\\') {
      if (pos + 1 >= lit.size()) fail("unterminated quote (literal ends in a backslash)");
      const char e = lit[pos + 1];
      pos += 2;
      switch (e) {
        case 'n': out.push_back('\n'); break;
        case 't': out.push_back('\t'); break;
        case 'r': out.push_back('\r'); break;
        case '\\': out.push_back('\\'); break;
        case '\'': out.push_back('\''); break;
        case '"': out.push_back('"'); break;
        case 'x':
        case 'u':
        case 'U': {
          const size_t n_hex = e == 'x' ? 2 : e == 'u' ? 4 : 8;
          if (is_bytes && e != 'x') fail(std::string("escape \\") + e + " is not allowed in a bytes literal");
          if (pos + n_hex > lit.size()) fail(std::string("truncated \\") + e + " escape");
          uint32_t cp = 0;
          for (size_t k = 0; k < n_hex; ++k) {
            int h = hex_value(lit[pos + k]);
            if (h < 0) {
              fail(std::string("bad \\") + e + " escape: '" + excerpt(lit.substr(pos, n_hex)) +
                   "' is not " + std::to_string(n_hex) + " hex digits");
            }
            cp = cp * 16 + uint32_t(h);
          }
          pos += n_hex;
          if (is_bytes) {
            out.push_back(char(cp));  // \xHH in a bytes literal is the raw byte
          } else {
            // In a str literal every escape is a code point, UTF-8 encoded (so '\xa0' is C2 A0).
            if (cp > 0x10FFFF) fail("code point " + std::to_string(cp) + " is above U+10FFFF");
            if (cp >= 0xD800 && cp <= 0xDFFF) fail("surrogate code point cannot be UTF-8 encoded");
            append_utf8(out, cp);
          }
          break;
        }
        default:
          fail("bad escape '\\" + excerpt(std::string_view(&lit[pos - 1], 1)) + "'");
      }
      continue;
    }
    if (c < 0x20 || c == 0x7F) fail("raw control character " + byte_hex(c) + " (python repr escapes it)");
    if (c >= 0x80) {
      if (is_bytes) fail("non-ASCII byte " + byte_hex(c) + " in a bytes literal");
      const size_t n = utf8_seq_len(reinterpret_cast<const uint8_t*>(lit.data()) + pos, lit.size() - pos);
      if (n == 0) fail("invalid UTF-8 at column " + std::to_string(pos + 1));
      out.append(lit.substr(pos, n));
      pos += n;
      continue;
    }
    out.push_back(char(c));
    ++pos;
  }
}

}  // namespace

bool is_valid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    // ASCII fast path, 8 bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      __builtin_memcpy(&w, p + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    const size_t len = utf8_seq_len(p + i, n - i);
    if (len == 0) return false;
    i += len;
  }
  return true;
}

Tokenizer Tokenizer::load(const std::string& vocab_path) {
  auto file = MappedFile::open(vocab_path);
  return parse(std::string_view(reinterpret_cast<const char*>(file->data()), file->size()), vocab_path);
}

Tokenizer Tokenizer::parse(std::string_view text, const std::string& name) {
  struct Entry {
    int32_t id;
    uint32_t offset;  // into `scratch`
    uint32_t length;
  };
  // Offsets are 32-bit; the real vocab is about 1 MB.
  if (text.size() > (size_t(1) << 30)) throw Error(name + ": vocab file is larger than 1 GiB");
  std::vector<Entry> entries;
  std::string scratch;  // token bytes in file order
  std::string bytes;
  std::vector<uint32_t> line_of_id;  // 0 = id not seen yet; grown on demand (cheap for small fuzz inputs)
  int32_t max_id = 0;

  size_t pos = 0;
  size_t line_no = 0;
  while (pos < text.size()) {
    ++line_no;
    size_t eol = text.find('\n', pos);
    if (eol == std::string_view::npos) eol = text.size();
    std::string_view line = text.substr(pos, eol - pos);
    pos = eol + 1;
    // Tolerate CRLF line ends (a checkout with autocrlf); a literal never holds a raw \r.
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    const std::string where = name + ":" + std::to_string(line_no) + ": ";
    if (line.empty()) throw Error(where + "empty line (expected '<id> <literal> <nbytes>')");

    const size_t first_sp = line.find(' ');
    const size_t last_sp = line.rfind(' ');
    if (first_sp == std::string_view::npos || first_sp == last_sp) {
      throw Error(where + "expected '<id> <literal> <nbytes>' (3 space-separated fields), got '" +
                  excerpt(line) + "'");
    }
    const std::string_view id_text = line.substr(0, first_sp);
    const std::string_view literal = line.substr(first_sp + 1, last_sp - first_sp - 1);
    const std::string_view nbytes_text = line.substr(last_sp + 1);

    const int64_t id = parse_decimal(id_text);
    if (id < 0) throw Error(where + "id field '" + excerpt(id_text) + "' is not a decimal integer");
    if (id < 1 || id > max_vocab_id) {
      throw Error(where + "id " + excerpt(id_text) + " is out of range 1.." + std::to_string(max_vocab_id) +
                  " (0 is the reserved end-of-doc token)");
    }
    const int64_t nbytes = parse_decimal(nbytes_text);
    if (nbytes < 0) throw Error(where + "nbytes field '" + excerpt(nbytes_text) + "' is not a decimal integer");

    parse_literal(literal, where, bytes);
    if (int64_t(bytes.size()) != nbytes) {
      throw Error(where + "nbytes mismatch: field says " + std::to_string(nbytes) + " but literal " +
                  excerpt(literal) + " is " + std::to_string(bytes.size()) + " bytes");
    }
    if (bytes.empty()) throw Error(where + "empty token " + excerpt(literal));
    if (size_t(id) >= line_of_id.size()) line_of_id.resize(std::max(size_t(id) + 1, line_of_id.size() * 2), 0);
    if (line_of_id[size_t(id)] != 0) {
      throw Error(where + "duplicate id " + std::to_string(id) + " (first defined on line " +
                  std::to_string(line_of_id[size_t(id)]) + ")");
    }
    line_of_id[size_t(id)] = uint32_t(line_no);
    entries.push_back({int32_t(id), uint32_t(scratch.size()), uint32_t(bytes.size())});
    scratch += bytes;
    max_id = std::max(max_id, int32_t(id));
  }
  if (entries.empty()) throw Error(name + ": no vocab entries (empty file)");

  Tokenizer tok;
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.id < b.id; });
  tok.offsets_.assign(size_t(max_id) + 2, 0);
  tok.blob_.reserve(scratch.size());
  size_t next = 0;
  for (int32_t id = 0; id <= max_id; ++id) {
    tok.offsets_[size_t(id)] = uint32_t(tok.blob_.size());
    if (next < entries.size() && entries[next].id == id) {
      tok.blob_.append(scratch, entries[next].offset, entries[next].length);
      tok.max_token_len_ = std::max(tok.max_token_len_, size_t(entries[next].length));
      ++next;
    }
  }
  tok.offsets_[size_t(max_id) + 1] = uint32_t(tok.blob_.size());
  tok.n_tokens_ = entries.size();
  tok.build_trie(name, line_of_id);
  return tok;
}

void Tokenizer::build_trie(const std::string& name, const std::vector<uint32_t>& line_of_id) {
  // Sort the ids by their bytes: every trie node is then a contiguous range sharing a prefix.
  std::vector<int32_t> sorted;
  sorted.reserve(n_tokens_);
  for (size_t id = 1; id + 1 < offsets_.size(); ++id) {
    if (offsets_[id + 1] > offsets_[id]) sorted.push_back(int32_t(id));
  }
  auto bytes_of = [&](int32_t id) { return std::string_view(blob_).substr(offsets_[id], offsets_[id + 1] - offsets_[id]); };
  std::sort(sorted.begin(), sorted.end(), [&](int32_t a, int32_t b) { return bytes_of(a) < bytes_of(b); });
  for (size_t i = 1; i < sorted.size(); ++i) {
    if (bytes_of(sorted[i - 1]) == bytes_of(sorted[i])) {
      int32_t a = sorted[i - 1], b = sorted[i];
      if (line_of_id[size_t(a)] > line_of_id[size_t(b)]) std::swap(a, b);
      throw Error(name + ":" + std::to_string(line_of_id[size_t(b)]) + ": id " + std::to_string(b) +
                  " has the same bytes '" + excerpt(bytes_of(b)) + "' as id " + std::to_string(a) + " (line " +
                  std::to_string(line_of_id[size_t(a)]) + ")");
    }
  }

  nodes_.clear();
  labels_.clear();
  dense_.clear();
  struct Work {
    uint32_t node;
    uint32_t lo, hi;  // range in `sorted`
    uint32_t depth;   // all ids in [lo, hi) share their first `depth` bytes
  };
  std::vector<Work> stack;
  nodes_.emplace_back();
  labels_.push_back(0);
  stack.push_back({0, 0, uint32_t(sorted.size()), 0});
  while (!stack.empty()) {
    Work w = stack.back();
    stack.pop_back();
    uint32_t lo = w.lo;
    // No duplicates, so at most one id ends exactly here, and it sorts first.
    if (lo < w.hi && bytes_of(sorted[lo]).size() == w.depth) nodes_[w.node].value = sorted[lo++];
    const auto first_child = uint32_t(nodes_.size());
    uint32_t n_children = 0;
    while (lo < w.hi) {
      const char label = bytes_of(sorted[lo])[w.depth];
      uint32_t hi = lo + 1;
      while (hi < w.hi && bytes_of(sorted[hi])[w.depth] == label) ++hi;
      nodes_.emplace_back();
      labels_.push_back(uint8_t(label));
      stack.push_back({first_child + n_children, lo, hi, w.depth + 1});
      ++n_children;
      lo = hi;
    }
    Node& node = nodes_[w.node];
    node.first_child = first_child;
    node.n_children = n_children;
    if (n_children >= dense_min_children) {
      const size_t slot = dense_.size() / 256;
      dense_.resize(dense_.size() + 256, 0);
      for (uint32_t k = 0; k < n_children; ++k) dense_[slot * 256 + labels_[first_child + k]] = first_child + k;
      node.dense = uint32_t(slot + 1);
    }
  }

  // Greedy matching always succeeds only if every single byte is a token (ids 1..256 in the World vocab).
  for (int b = 0; b < 256; ++b) {
    const uint32_t c = child(nodes_[0], uint8_t(b));
    if (c == 0 || nodes_[c].value == 0) {
      throw Error(name + ": no token for the single byte " + byte_hex(uint8_t(b)) +
                  " (all 256 single bytes must be in the vocab so that any input can be encoded)");
    }
  }
}

inline uint32_t Tokenizer::child(const Node& n, uint8_t byte) const {
  if (n.dense) return dense_[size_t(n.dense - 1) * 256 + byte];
  const uint8_t* l = labels_.data() + n.first_child;
  for (uint32_t k = 0; k < n.n_children; ++k) {
    if (l[k] == byte) return n.first_child + k;
  }
  return 0;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  const auto* p = reinterpret_cast<const uint8_t*>(text.data());
  const uint8_t* const end = p + text.size();
  const Node* nodes = nodes_.data();
  while (p < end) {
    // The root has all 256 children, each a token (checked in build_trie).
    uint32_t cur = child(nodes[0], *p);
    int32_t best = nodes[cur].value;
    const uint8_t* best_end = p + 1;
    for (const uint8_t* q = p + 1; q < end; ++q) {
      cur = child(nodes[cur], *q);
      if (cur == 0) break;
      if (nodes[cur].value != 0) {
        best = nodes[cur].value;
        best_end = q + 1;
      }
    }
    out.push_back(best);
    p = best_end;
  }
  return out;
}

bool Tokenizer::has_token(int32_t id) const {
  return id > 0 && size_t(id) + 1 < offsets_.size() && offsets_[size_t(id) + 1] > offsets_[size_t(id)];
}

std::string_view Tokenizer::token_bytes(int32_t id) const {
  if (id == 0) return {};
  if (!has_token(id)) {
    throw Error("token id " + std::to_string(id) + " is not in the vocab (valid ids: 1.." +
                std::to_string(vocab_size() - 1) + ", 0 = end of doc)");
  }
  return std::string_view(blob_).substr(offsets_[size_t(id)], offsets_[size_t(id) + 1] - offsets_[size_t(id)]);
}

std::string Tokenizer::decode_bytes(std::span<const int32_t> ids) const {
  std::string out;
  out.reserve(ids.size() * 4);
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id == 0) continue;
    if (!has_token(id)) {
      throw Error("decode: token id " + std::to_string(id) + " at index " + std::to_string(i) +
                  " is not in the vocab (valid ids: 1.." + std::to_string(vocab_size() - 1) + ", 0 = end of doc)");
    }
    out.append(blob_, offsets_[size_t(id)], offsets_[size_t(id) + 1] - offsets_[size_t(id)]);
  }
  return out;
}

std::string Tokenizer::decode_strict(std::span<const int32_t> ids) const {
  std::string out = decode_bytes(ids);
  if (!is_valid_utf8(out)) {
    // Name the first bad byte so a caller can see where the sequence breaks.
    const auto* p = reinterpret_cast<const uint8_t*>(out.data());
    size_t i = 0;
    while (i < out.size()) {
      const size_t n = utf8_seq_len(p + i, out.size() - i);
      if (n == 0) break;
      i += n;
    }
    throw Error("decode: the tokens' bytes are not valid UTF-8 (first bad byte " + byte_hex(p[i]) +
                " at byte offset " + std::to_string(i) + " of " + std::to_string(out.size()) + ")");
  }
  return out;
}

std::string Tokenizer::decode_compat(std::span<const int32_t> ids) const {
  static const std::string replacement = "\xEF\xBF\xBD";
  std::string out;
  out.reserve(ids.size() * 4);
  for (const int32_t id : ids) {
    // The official decodeBytes raises KeyError on id 0 or an unknown id; decode() turns that into U+FFFD.
    if (!has_token(id)) return replacement;
    out.append(blob_, offsets_[size_t(id)], offsets_[size_t(id) + 1] - offsets_[size_t(id)]);
  }
  if (!is_valid_utf8(out)) return replacement;
  return out;
}

std::string default_vocab_path() {
  static constexpr const char* file_name = "rwkv_vocab_v20230424.txt";
  if (const char* env = std::getenv("RWKVX_VOCAB"); env != nullptr && env[0] != '\0') return env;
  std::vector<std::string> candidates;
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec && !exe.empty()) {
    const std::filesystem::path dir = exe.parent_path();
    candidates.push_back((dir / ".." / "data" / file_name).lexically_normal().string());
    candidates.push_back((dir / ".." / "share" / "rwkvx" / file_name).lexically_normal().string());
  }
#ifdef RWKVX_SOURCE_DIR
  candidates.push_back(std::string(RWKVX_SOURCE_DIR) + "/data/" + file_name);
#endif
  if (candidates.empty()) return std::string("data/") + file_name;
  for (const auto& c : candidates) {
    if (std::filesystem::is_regular_file(c, ec)) return c;
  }
  return candidates.back();
}

}  // namespace rwkvx
