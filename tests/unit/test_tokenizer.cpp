// Tests of the RWKV World tokenizer (spec §1): golden encodings from ../shared/golden/tokenizer, the §1.2
// id table, random byte round trips (seed printed), decode_compat's U+FFFD rule, and the strict vocab
// parser: every malformed line must throw rwkvx::Error naming its line number.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "runtime/tokenizer.h"

namespace rwkvx {
namespace {

const std::string shared_dir = RWKVX_SHARED_DIR;
const std::string vocab_path = shared_dir + "/data/rwkv_vocab_v20230424.txt";

// Seed for the randomized tests: $RWKVX_TEST_SEED reproduces a printed run, else a fresh one.
uint32_t test_seed(const char* test_name) {
  const char* env = std::getenv("RWKVX_TEST_SEED");
  const uint32_t seed = env != nullptr ? uint32_t(std::strtoul(env, nullptr, 10)) : std::random_device{}();
  std::printf("%s: seed %u (rerun with RWKVX_TEST_SEED=%u)\n", test_name, seed, seed);
  return seed;
}

const Tokenizer& world() {
  static const Tokenizer tok = Tokenizer::load(vocab_path);
  return tok;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) out.push_back(char(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

// The 256 single-byte lines of the World vocab (ids 1..256, id = byte + 1), in the file's own spelling:
// str literals for ASCII, bytes literals for 0x80..0xff.
std::string base_vocab() {
  static const char* hex = "0123456789abcdef";
  std::string v;
  for (int b = 0; b < 256; ++b) {
    std::string lit;
    if (b == '\\') lit = "'\\\\'";
    else if (b == '\'') lit = "\"'\"";
    else if (b == '\n') lit = "'\\n'";
    else if (b == '\t') lit = "'\\t'";
    else if (b == '\r') lit = "'\\r'";
    else if (b >= 0x20 && b < 0x7f) lit = std::string("'") + char(b) + "'";
    else lit = std::string(b >= 0x80 ? "b'" : "'") + "\\x" + hex[b >> 4] + hex[b & 15] + "'";
    v += std::to_string(b + 1) + " " + lit + " 1\n";
  }
  return v;
}

// Expects parse(text) to throw rwkvx::Error whose message contains every string in `needles`.
void expect_parse_error(const std::string& text, const std::vector<std::string>& needles) {
  try {
    Tokenizer::parse(text, "vocab.txt");
    ADD_FAILURE() << "no error for vocab ending in: " << text.substr(text.size() > 80 ? text.size() - 80 : 0);
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "message: " << msg << "\nmissing: " << n;
  }
}

TEST(Tokenizer, LoadsWorldVocab) {
  const Tokenizer& tok = world();
  EXPECT_EQ(tok.vocab_size(), 65530u);
  EXPECT_EQ(tok.n_tokens(), 65529u);
  EXPECT_EQ(tok.max_token_len(), 128u);
  EXPECT_EQ(tok.token_bytes(65529), std::string(128, ' '));
  EXPECT_EQ(tok.token_bytes(0), "");
  EXPECT_FALSE(tok.has_token(0));
  EXPECT_FALSE(tok.has_token(65530));
  EXPECT_THROW(tok.token_bytes(65530), Error);
  EXPECT_THROW(tok.token_bytes(-1), Error);
  for (int b = 0; b < 256; ++b) EXPECT_EQ(tok.token_bytes(b + 1), std::string(1, char(b))) << "byte " << b;
}

TEST(Tokenizer, SpecTableIds) {
  const Tokenizer& tok = world();
  EXPECT_EQ(tok.token_bytes(11), "\n");
  EXPECT_EQ(tok.token_bytes(33), " ");
  EXPECT_EQ(tok.token_bytes(261), "\n\n");
  EXPECT_EQ(tok.token_bytes(24281), "User");
  EXPECT_EQ(tok.token_bytes(5585), "Ass");
  EXPECT_EQ(tok.token_bytes(41693), "istant");
  EXPECT_EQ(tok.token_bytes(59), ":");
  for (int d = 0; d < 10; ++d) EXPECT_EQ(tok.token_bytes(49 + d), std::string(1, char('0' + d)));
  // Line 65297: str literal '\xa0' x8 means code points U+00A0, i.e. 16 bytes C2 A0 ...
  std::string nbsp8;
  for (int i = 0; i < 8; ++i) nbsp8 += "\xC2\xA0";
  EXPECT_EQ(tok.token_bytes(65297), nbsp8);
  // Id 3008 is the bytes literal b'\xe2\x82'.
  EXPECT_EQ(tok.token_bytes(3008), "\xE2\x82");
  EXPECT_EQ(tok.encode("\n"), std::vector<int32_t>{11});
  EXPECT_EQ(tok.encode("\n\n"), std::vector<int32_t>{261});
  EXPECT_EQ(tok.encode("User"), std::vector<int32_t>{24281});
}

TEST(Tokenizer, GoldenCases) {
  const Tokenizer& tok = world();
  std::ifstream f(shared_dir + "/golden/tokenizer/cases.jsonl");
  ASSERT_TRUE(f) << "missing " << shared_dir << "/golden/tokenizer/cases.jsonl";
  std::string line;
  int n = 0;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    const auto j = nlohmann::json::parse(line);
    const std::string text = j.at("text").get<std::string>();
    const auto ids = j.at("ids").get<std::vector<int32_t>>();
    EXPECT_EQ(tok.encode(text), ids) << "text: " << text;
    EXPECT_EQ(tok.decode_bytes(ids), text);
    EXPECT_EQ(tok.decode_compat(ids), text);
    EXPECT_EQ(tok.decode_strict(ids), text);
    ++n;
  }
  EXPECT_EQ(n, 14);
}

TEST(Tokenizer, GoldenBytesCase) {
  const Tokenizer& tok = world();
  const auto j = nlohmann::json::parse(read_file(shared_dir + "/golden/tokenizer/bytes_case.json"));
  const std::string bytes = from_hex(j.at("bytes_hex").get<std::string>());
  const auto ids = j.at("ids").get<std::vector<int32_t>>();
  ASSERT_EQ(bytes, std::string("\xff\xfe\x41\xc3\x28\xe2\x82"));
  EXPECT_EQ(tok.encode(bytes), ids);
  EXPECT_EQ(tok.decode_bytes(ids), bytes);
  EXPECT_EQ(tok.decode_compat(ids), "\xEF\xBF\xBD");
  EXPECT_THROW(tok.decode_strict(ids), Error);
}

TEST(Tokenizer, RandomBytesRoundTrip) {
  const Tokenizer& tok = world();
  const uint32_t seed = test_seed("RandomBytesRoundTrip");
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  // Mix uniform bytes (mostly invalid UTF-8) with text-like bytes so that long tokens are matched too.
  const std::string alphabet = " \n\n\ttheandUserAssistant:0123456789.,-\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x9A\x80";
  for (int iter = 0; iter < 2000; ++iter) {
    const size_t len = rng() % 301;
    std::string s(len, '\0');
    const bool text_like = iter % 2 == 1;
    for (auto& c : s) c = text_like ? alphabet[rng() % alphabet.size()] : char(rng());
    const auto ids = tok.encode(s);
    ASSERT_LE(ids.size(), s.size());
    for (const int32_t id : ids) {
      ASSERT_GT(id, 0);
      ASSERT_TRUE(tok.has_token(id));
    }
    ASSERT_EQ(tok.decode_bytes(ids), s) << "iteration " << iter;
    ASSERT_EQ(tok.decode_compat(ids), is_valid_utf8(s) ? s : std::string("\xEF\xBF\xBD"));
  }
}

TEST(Tokenizer, MatchesBruteForceLongestMatch) {
  // The §1.2 alternative: a hash of byte strings probed from min(128, remaining) down to 1.
  const Tokenizer& tok = world();
  std::unordered_map<std::string_view, int32_t> by_bytes;
  for (int32_t id = 1; id < int32_t(tok.vocab_size()); ++id) by_bytes.emplace(tok.token_bytes(id), id);
  auto brute = [&](std::string_view s) {
    std::vector<int32_t> out;
    for (size_t i = 0; i < s.size();) {
      for (size_t len = std::min<size_t>(128, s.size() - i); len > 0; --len) {
        auto it = by_bytes.find(s.substr(i, len));
        if (it != by_bytes.end()) {
          out.push_back(it->second);
          i += len;
          break;
        }
      }
    }
    return out;
  };
  const uint32_t seed = test_seed("MatchesBruteForceLongestMatch");
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  // Build text from random token concatenations so that long and multi-byte tokens meet at boundaries.
  for (int iter = 0; iter < 300; ++iter) {
    std::string s;
    const int n = int(rng() % 40);
    for (int k = 0; k < n; ++k) s += tok.token_bytes(int32_t(1 + rng() % (tok.vocab_size() - 1)));
    ASSERT_EQ(tok.encode(s), brute(s)) << "iteration " << iter;
  }
  std::string spec_text = read_file(shared_dir + "/spec/system.md");
  EXPECT_EQ(tok.encode(spec_text), brute(spec_text));
}

TEST(Tokenizer, LongestMatchBeatsShorterPrefixes) {
  const Tokenizer& tok = world();
  // 129 spaces: the 128-space token, then a single space.
  EXPECT_EQ(tok.encode(std::string(129, ' ')), (std::vector<int32_t>{65529, 33}));
  EXPECT_EQ(tok.encode(std::string(128, ' ')), std::vector<int32_t>{65529});
  EXPECT_TRUE(tok.encode("").empty());
}

TEST(Tokenizer, DecodeRules) {
  const Tokenizer& tok = world();
  const std::vector<int32_t> hello = {33155, 40213, 34};
  EXPECT_EQ(tok.decode_bytes(std::vector<int32_t>{0, 33155, 0, 40213, 34, 0}), "Hello world!");
  EXPECT_EQ(tok.decode_compat(hello), "Hello world!");
  // Id 0 or an unknown id makes the official decode return the single U+FFFD.
  EXPECT_EQ(tok.decode_compat(std::vector<int32_t>{33155, 0}), "\xEF\xBF\xBD");
  EXPECT_EQ(tok.decode_compat(std::vector<int32_t>{33155, 70000}), "\xEF\xBF\xBD");
  EXPECT_EQ(tok.decode_compat(std::vector<int32_t>{-5}), "\xEF\xBF\xBD");
  // Invalid UTF-8 (a lone 0xff) and incomplete UTF-8 (first two bytes of a 3-byte char) give U+FFFD.
  EXPECT_EQ(tok.decode_compat(std::vector<int32_t>{33155, 256}), "\xEF\xBF\xBD");
  EXPECT_EQ(tok.decode_compat(std::vector<int32_t>{3008}), "\xEF\xBF\xBD");
  const std::string zh = "中文分词测试：你好，世界。";
  EXPECT_EQ(tok.decode_compat(tok.encode(zh)), zh);
  EXPECT_TRUE(tok.decode_compat(std::vector<int32_t>{}).empty());
  // decode_bytes: unknown ids throw, naming the id and its index.
  try {
    tok.decode_bytes(std::vector<int32_t>{33155, 40213, 65530});
    ADD_FAILURE() << "no error for id 65530";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("65530"), std::string::npos) << msg;
    EXPECT_NE(msg.find("index 2"), std::string::npos) << msg;
  }
  EXPECT_THROW(tok.decode_bytes(std::vector<int32_t>{-1}), Error);
}

TEST(Utf8, StrictValidation) {
  EXPECT_TRUE(is_valid_utf8(""));
  EXPECT_TRUE(is_valid_utf8("plain ascii text that is longer than eight bytes"));
  EXPECT_TRUE(is_valid_utf8("\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x9A\x80\xF4\x8F\xBF\xBF"));
  EXPECT_FALSE(is_valid_utf8("\xC0\xAF"));          // overlong
  EXPECT_FALSE(is_valid_utf8("\xE0\x80\xAF"));      // overlong
  EXPECT_FALSE(is_valid_utf8("\xED\xA0\x80"));      // surrogate
  EXPECT_FALSE(is_valid_utf8("\xF4\x90\x80\x80"));  // above U+10FFFF
  EXPECT_FALSE(is_valid_utf8("abc\xE2\x82"));       // truncated
  EXPECT_FALSE(is_valid_utf8("\x80"));              // lone continuation
  EXPECT_FALSE(is_valid_utf8("abcdefgh\xFF"));
}

TEST(VocabParser, SmallVocabAndLiteralForms) {
  const std::string v = base_vocab() +
                        "257 'ab' 2\n"
                        "258 'abc' 3\n"
                        "259 '\\xa0' 2\n"          // str \xHH is a code point: C2 A0
                        "260 b'\\xe2\\x82' 2\n"    // bytes \xHH is a raw byte
                        "261 '\\u4e2d' 3\n"
                        "262 '\\U0001F680' 4\n"
                        "263 \"it's\" 4\n"
                        "264 'say \"hi\"' 8\n"
                        "265 'a b' 3\n"           // a literal may contain spaces
                        "266 '\\'\\\"' 2\n"
                        "267 '中文' 6\n"          // raw non-ASCII stands for itself
                        "300 'xyz' 3";            // no final newline; ids may have gaps
  const Tokenizer tok = Tokenizer::parse(v, "small.txt");
  EXPECT_EQ(tok.vocab_size(), 301u);
  EXPECT_EQ(tok.n_tokens(), 256u + 12u);
  EXPECT_EQ(tok.token_bytes(259), "\xC2\xA0");
  EXPECT_EQ(tok.token_bytes(260), "\xE2\x82");
  EXPECT_EQ(tok.token_bytes(261), "\xE4\xB8\xAD");
  EXPECT_EQ(tok.token_bytes(262), "\xF0\x9F\x9A\x80");
  EXPECT_EQ(tok.token_bytes(263), "it's");
  EXPECT_EQ(tok.token_bytes(264), "say \"hi\"");
  EXPECT_EQ(tok.token_bytes(265), "a b");
  EXPECT_EQ(tok.token_bytes(266), "'\"");
  EXPECT_EQ(tok.token_bytes(267), "中文");
  EXPECT_FALSE(tok.has_token(280));
  EXPECT_THROW(tok.decode_bytes(std::vector<int32_t>{280}), Error);
  EXPECT_EQ(tok.encode("abcd"), (std::vector<int32_t>{258, 101}));
  EXPECT_EQ(tok.encode("aba"), (std::vector<int32_t>{257, 98}));
  EXPECT_EQ(tok.encode("xyzab"), (std::vector<int32_t>{300, 257}));
  EXPECT_EQ(tok.encode("中文中"), (std::vector<int32_t>{267, 261}));
  // CRLF line ends are accepted.
  const std::string crlf = base_vocab() + "257 'ab' 2\r\n";
  EXPECT_EQ(Tokenizer::parse(crlf, "crlf.txt").encode("ab"), std::vector<int32_t>{257});
}

TEST(VocabParser, MalformedLinesNameTheLine) {
  const std::string base = base_vocab();  // lines 1..256, so the bad line is line 257
  const std::string at = "vocab.txt:257:";
  expect_parse_error(base + "257 'ab'\n", {at, "3 space-separated fields"});         // missing nbytes
  expect_parse_error(base + "257\n", {at});                                           // missing everything
  expect_parse_error(base + "\n257 'ab' 2\n", {at, "empty line"});
  expect_parse_error(base + "257 'a\\qb' 3\n", {at, "bad escape"});
  expect_parse_error(base + "257 'a\\x4' 2\n", {at, "\\x"});
  expect_parse_error(base + "257 'a\\xZZ' 2\n", {at, "hex"});
  expect_parse_error(base + "257 b'\\u1234' 2\n", {at, "bytes literal"});
  expect_parse_error(base + "257 '\\ud800' 3\n", {at, "surrogate"});
  expect_parse_error(base + "257 '\\U00110000' 4\n", {at, "U+10FFFF"});
  expect_parse_error(base + "257 'ab' 3\n", {at, "nbytes mismatch", "3", "2"});
  expect_parse_error(base + "257 '\\xa0' 1\n", {at, "nbytes mismatch"});  // str \xa0 is 2 bytes
  expect_parse_error(base + "5 'ab' 2\n", {at, "duplicate id 5", "line 5"});
  expect_parse_error(base + "x57 'ab' 2\n", {at, "id field"});
  expect_parse_error(base + "-1 'ab' 2\n", {at, "id field"});
  expect_parse_error(base + "257 'ab' two\n", {at, "nbytes field"});
  expect_parse_error(base + "257 'ab 2\n", {at, "unterminated"});
  expect_parse_error(base + "257 'ab\\' 2\n", {at, "unterminated"});
  expect_parse_error(base + "257 ab 2\n", {at, "python str or bytes"});
  expect_parse_error(base + "257 'a'b' 3\n", {at, "closing quote"});
  expect_parse_error(base + "257 b'\xC3\xA9' 2\n", {at, "non-ASCII"});
  expect_parse_error(base + "257 '\xC3' 1\n", {at, "invalid UTF-8"});
  expect_parse_error(base + "257 'a\tb' 3\n", {at, "control character"});
  expect_parse_error(base + "257 '' 0\n", {at, "empty token"});
  expect_parse_error(base + "0 'ab' 2\n", {at, "out of range"});
  expect_parse_error(base + "65536 'ab' 2\n", {at, "out of range"});
  expect_parse_error(base + "99999999999999999999 'ab' 2\n", {at, "out of range"});
  expect_parse_error(base + "257 'ab' 99999999999999999999\n", {at, "nbytes mismatch"});
  // Duplicate bytes: the later line is named, with the earlier id and line.
  expect_parse_error(base + "257 'ab' 2\n258 'ab' 2\n", {"vocab.txt:258:", "id 258", "id 257", "line 257"});
  expect_parse_error(base + "257 '\\u4e2d' 3\n258 '中' 3\n", {"vocab.txt:258:", "same bytes"});
  // An error on line 1 is reported even before the single-byte check.
  expect_parse_error("1 '\\x00 1\n", {"vocab.txt:1:", "unterminated"});
}

TEST(VocabParser, FileLevelErrors) {
  expect_parse_error("", {"vocab.txt", "empty"});
  // Missing single byte 0x41 ('A', id 66).
  std::string v = base_vocab();
  const size_t p = v.find("66 'A' 1\n");
  ASSERT_NE(p, std::string::npos);
  v.erase(p, 9);
  expect_parse_error(v, {"vocab.txt", "0x41"});
  EXPECT_THROW(Tokenizer::load("/nonexistent/rwkv_vocab.txt"), Error);
}

TEST(VocabParser, NeverCrashesOnMutations) {
  // Cheap in-test fuzzing (the libFuzzer target goes further): mutate lines of a valid small vocab.
  const uint32_t seed = test_seed("NeverCrashesOnMutations");
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  const std::string good = base_vocab() + "257 'ab' 2\n258 b'\\xe2\\x82' 2\n259 '\\u4e2d\\xa0' 5\n";
  for (int iter = 0; iter < 3000; ++iter) {
    std::string v = good;
    const int n_mut = 1 + int(rng() % 4);
    for (int m = 0; m < n_mut; ++m) {
      const size_t pos = v.size() - 1 - rng() % 60;
      switch (rng() % 3) {
        case 0: v[pos] = char(rng()); break;
        case 1: v.erase(pos, 1); break;
        default: v.insert(pos, 1, "\\'\" xbu0123456789"[rng() % 17]); break;
      }
    }
    try {
      const Tokenizer tok = Tokenizer::parse(v, "mut.txt");
      const std::string probe = "ab\xE2\x82\xE4\xB8\xAD\xC2\xA0 xyz";
      ASSERT_EQ(tok.decode_bytes(tok.encode(probe)), probe);
    } catch (const Error& e) {
      ASSERT_NE(std::string(e.what()).find("mut.txt"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace rwkvx
