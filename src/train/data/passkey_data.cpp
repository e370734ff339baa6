// Synthetic passkey-retrieval documents, see passkey_data.h.
#include "train/data/passkey_data.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "eval/passkey.h"
#include "train/data/splitmix.h"

namespace rwkvx {
namespace {

const char* const kOfficialInstruction =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you "
    "about the important information there.";

// Other instruction lines; "" = none.
const std::vector<std::string>& instructions() {
  static const std::vector<std::string> v = {
      kOfficialInstruction,
      "",
      "Read the text below. A number is hidden in it, and you will be asked for it at the end.",
      "Somewhere in the following text there is a key. Remember it.",
      "Below is a long text with one important line. Find the important line and remember it.",
      "Pay attention: the text contains a code that you must recall later.",
  };
  return v;
}

// A needle ({K} is the key) and the question whose continuation is " K.".
struct Needle {
  const char* sentence;
  const char* question;
};
const std::vector<Needle>& needles() {
  static const std::vector<Needle> v = {
      {"The pass key is {K}. Remember it. {K} is the pass key.", "What is the pass key? The pass key is"},
      {"The pass key is {K}.", "What is the pass key? The pass key is"},
      {"Remember this pass key: {K}. The pass key is {K}.", "What is the pass key? The pass key is"},
      {"The secret number is {K}. Keep it in mind.", "What is the secret number? The secret number is"},
      {"The access code is {K}. Do not forget the access code.", "What is the access code? The access code is"},
      {"{K} is the magic number. The magic number is {K}.", "Which number is the magic number? The magic number is"},
      {"Note: the special key is {K}.", "Tell me the special key. The special key is"},
      {"The password for the door is {K}. Remember it.", "What is the password for the door? The password is"},
  };
  return v;
}

// Sentences of the repeated fillers (the official G uses the first five).
const std::vector<std::string>& sentences() {
  static const std::vector<std::string> v = {
      "The grass is green.",        "The sky is blue.",          "The sun is yellow.",
      "Here we go.",                "There and back again.",     "The river runs to the sea.",
      "Birds sing in the morning.", "The road is long.",         "Snow falls in winter.",
      "The moon is bright tonight.", "Bread is baked in the oven.", "The cat sleeps on the mat.",
      "Rain falls on the hills.",   "The wind blows from the west.", "A ship sails on the water.",
      "The stars are far away.",    "Leaves turn red in autumn.", "The clock ticks on the wall.",
      "Children play in the park.", "The mountain is tall.",     "Fish swim in the lake.",
      "The door is open.",          "The fire is warm.",         "Trees grow in the forest.",
      "The bell rings at noon.",    "We walk along the shore.",  "The old house stands on the hill.",
      "Apples grow on the tree.",   "The light is on.",          "Time passes slowly.",
  };
  return v;
}

std::string replace_key(std::string s, const std::string& k) {
  for (size_t at; (at = s.find("{K}")) != std::string::npos;) s.replace(at, 3, k);
  return s;
}

double uniform01(SplitMix64& r) { return double(r.next() >> 11) * 0x1.0p-53; }

// The first n characters of `unit` repeated and joined by single spaces (as the official G).
std::string repeated(const std::string& unit, int64_t n) {
  std::string g;
  g.reserve(size_t(n) + unit.size() + 1);
  while (int64_t(g.size()) < n) {
    if (!g.empty()) g += ' ';
    g += unit;
  }
  g.resize(size_t(n));
  return g;
}

bool utf8_continuation(char c) { return (uint8_t(c) & 0xC0) == 0x80; }

// About n characters of `text` from a random place, starting after a space or line break and ending on
// a UTF-8 character boundary; line breaks become spaces, runs of spaces one space.
std::string passage(const std::string& text, int64_t n, SplitMix64& r) {
  const size_t span = text.size() - size_t(n);
  size_t a = size_t(r.below(uint64_t(span) + 1));
  while (a < text.size() && a > 0 && text[a - 1] != ' ' && text[a - 1] != '\n') ++a;
  while (a < text.size() && utf8_continuation(text[a])) ++a;
  std::string out;
  out.reserve(size_t(n));
  for (size_t i = a; i < text.size() && int64_t(out.size()) < n; ++i) {
    char c = text[i];
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
    if (c == ' ' && (out.empty() || out.back() == ' ')) continue;
    out += c;
  }
  while (!out.empty() && utf8_continuation(out.back())) out.pop_back();
  if (!out.empty() && (uint8_t(out.back()) & 0xC0) == 0xC0) out.pop_back();  // a lead byte cut from its tail
  return out;
}

// Cuts s at about `at` bytes, moved back to a UTF-8 character boundary.
size_t char_boundary(const std::string& s, size_t at) {
  at = std::min(at, s.size());
  while (at > 0 && at < s.size() && utf8_continuation(s[at])) --at;
  return at;
}

}  // namespace

void validate_passkey_data(const PasskeyDataOptions& o) {
  if (o.docs < 1) throw Error("--docs must be >= 1");
  if (o.min_chars < 0 || o.max_chars < o.min_chars || o.max_chars < 1)
    throw Error("--min-chars/--max-chars: need 0 <= min <= max and max >= 1 (got " + std::to_string(o.min_chars) +
                ", " + std::to_string(o.max_chars) + ")");
  if (o.min_digits < 1 || o.max_digits < o.min_digits || o.max_digits > 9)
    throw Error("--min-digits/--max-digits: need 1 <= min <= max <= 9 (got " + std::to_string(o.min_digits) + ", " +
                std::to_string(o.max_digits) + ")");
  if (!(o.official_fraction >= 0 && o.haystack_fraction >= 0 && o.official_fraction + o.haystack_fraction <= 1))
    throw Error("--official-fraction and --haystack-fraction must be >= 0 with a sum <= 1");
  if (!(o.edge_depth_fraction >= 0 && o.edge_depth_fraction <= 1))
    throw Error("--edge-depth-fraction must be in [0, 1] (got " + std::to_string(o.edge_depth_fraction) + ")");
  if (o.haystack_fraction > 0 && o.haystack.empty())
    throw Error("--haystack-fraction > 0 needs at least one --haystack text file");
  for (size_t i = 0; i < o.haystack.size(); ++i)
    if (int64_t(o.haystack[i].size()) < 2 * o.max_chars)
      throw Error("haystack text " + std::to_string(i + 1) + " has " + std::to_string(o.haystack[i].size()) +
                  " bytes; it needs at least 2 x --max-chars = " + std::to_string(2 * o.max_chars));
}

PasskeyDocument passkey_document(const PasskeyDataOptions& o, uint64_t index) {
  SplitMix64 r(o.seed * 0x100000001b3ull ^ (index + 1) * 0x9e3779b97f4a7c15ull);
  PasskeyDocument d;
  // Length (log-uniform), depth, key.
  const double lo = std::log(double(std::max<int64_t>(o.min_chars, 1))), hi = std::log(double(o.max_chars));
  d.filler_chars = std::clamp<int64_t>(int64_t(std::exp(lo + (hi - lo) * uniform01(r))), o.min_chars, o.max_chars);
  d.depth_chars = int64_t(std::floor(uniform01(r) * double(d.filler_chars + 1)));
  d.depth_chars = std::min(d.depth_chars, d.filler_chars);
  if (o.edge_depth_fraction > 0 && uniform01(r) < o.edge_depth_fraction)
    d.depth_chars = r.below(2) == 0 ? 0 : d.filler_chars;
  const int digits = o.min_digits + int(r.below(uint64_t(o.max_digits - o.min_digits + 1)));
  const int64_t first = digits == 1 ? 0 : int64_t(std::pow(10.0, digits - 1)), last = int64_t(std::pow(10.0, digits));
  d.key = first + int64_t(r.below(uint64_t(last - first)));
  const std::string k = std::to_string(d.key);

  const double kind = uniform01(r);
  if (kind < o.official_fraction) {
    d.kind = "official";
    d.text = passkey_prompt(d.filler_chars, d.depth_chars, int(d.key)) + " " + k + ".";
    return d;
  }
  const std::string& instruction = instructions()[r.below(instructions().size())];
  const Needle& needle = needles()[r.below(needles().size())];
  std::string before, after;
  if (kind < o.official_fraction + o.haystack_fraction) {
    d.kind = "haystack";
    const std::string& text = o.haystack[r.below(o.haystack.size())];
    const std::string p = passage(text, d.filler_chars, r);
    const size_t cut = char_boundary(p, size_t(d.depth_chars));
    before = p.substr(0, cut), after = p.substr(cut);
    d.filler_chars = int64_t(p.size()), d.depth_chars = int64_t(cut);
  } else {
    d.kind = "sentences";
    const std::vector<std::string>& pool = sentences();
    const size_t n = 3 + r.below(4);  // 3 to 6 distinct sentences
    std::vector<size_t> pick;
    while (pick.size() < n) {
      const size_t s = r.below(pool.size());
      if (std::find(pick.begin(), pick.end(), s) == pick.end()) pick.push_back(s);
    }
    std::string unit;
    for (size_t s : pick) unit += (unit.empty() ? "" : " ") + pool[s];
    // Like the official prompt, both pieces start at the beginning of the repetition.
    before = repeated(unit, d.depth_chars), after = repeated(unit, d.filler_chars - d.depth_chars);
  }
  std::string text = instruction.empty() ? "" : instruction + "\n";
  text += before + "\n" + replace_key(needle.sentence, k) + "\n" + after + "\n" + needle.question + " " + k + ".";
  d.text = std::move(text);
  return d;
}

void write_passkey_jsonl(const std::string& path, const PasskeyDataOptions& o) {
  validate_passkey_data(o);
  AtomicFile f(path);
  for (uint64_t i = 0; i < o.docs; ++i) {
    const std::string line = nlohmann::json{{"text", passkey_document(o, i).text}}.dump() + "\n";
    f.write(line.data(), line.size());
  }
  f.commit();
}

}  // namespace rwkvx
