// Passkey retrieval (spec system.md §5.1), see passkey.h.
#include "eval/passkey.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "core/error.h"
#include "model/model.h"
#include "model/state_copy.h"
#include "runtime/tokenizer.h"

namespace rwkvx {

int passkey_key(uint32_t seed) {
  // numpy's legacy RandomState.seed(int) is MT19937 init_genrand, which std::mt19937(seed) also uses;
  // randint(1, 50000) draws from a range of 49999 values with a 16-bit mask and rejection.
  std::mt19937 mt(seed);
  for (;;) {
    const uint32_t v = mt() & 0xFFFFu;
    if (v <= 49998u) return int(v) + 1;
  }
}

int64_t passkey_filler_chars(int64_t length_label) { return (length_label * 3750 / 1000 / 1000) * 1000; }

std::string passkey_filler(int64_t n) {
  static const std::string unit = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
  std::string g;
  g.reserve(size_t(std::max<int64_t>(n, 0)) + unit.size() + 1);
  while (int64_t(g.size()) < n) {
    if (!g.empty()) g += ' ';
    g += unit;
  }
  g.resize(size_t(std::max<int64_t>(n, 0)));
  return g;
}

std::string passkey_prompt(int64_t filler_chars, int64_t depth_chars, int key) {
  if (depth_chars < 0 || depth_chars > filler_chars)
    throw Error("passkey: depth " + std::to_string(depth_chars) + " characters is outside the filler of " +
                std::to_string(filler_chars) + " characters");
  const std::string g = passkey_filler(filler_chars), k = std::to_string(key);
  return "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz "
         "you about the important information there.\n" +
         g.substr(0, size_t(depth_chars)) + "\nThe pass key is " + k + ". Remember it. " + k +
         " is the pass key.\n" + g.substr(0, size_t(filler_chars - depth_chars)) +
         "\nWhat is the pass key? The pass key is";
}

namespace {

// Length in bytes of a whitespace code point (Python's str.isspace) at s[i], or 0.
size_t space_at(const std::string& s, size_t i) {
  const auto b = [&](size_t k) { return k < s.size() ? uint8_t(s[k]) : 0; };
  const uint8_t c = b(i);
  if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) return 1;
  if (c == 0xC2 && (b(i + 1) == 0x85 || b(i + 1) == 0xA0)) return 2;
  if (c == 0xE1 && b(i + 1) == 0x9A && b(i + 2) == 0x80) return 3;  // U+1680
  if (c == 0xE2 && b(i + 1) == 0x80) {
    const uint8_t d = b(i + 2);  // U+2000..U+200A, U+2028, U+2029, U+202F
    if ((d >= 0x80 && d <= 0x8A) || d == 0xA8 || d == 0xA9 || d == 0xAF) return 3;
  }
  if (c == 0xE2 && b(i + 1) == 0x81 && b(i + 2) == 0x9F) return 3;  // U+205F
  if (c == 0xE3 && b(i + 1) == 0x80 && b(i + 2) == 0x80) return 3;  // U+3000
  return 0;
}

}  // namespace

std::string strip_whitespace(const std::string& s) {
  size_t a = 0;
  while (a < s.size()) {
    const size_t n = space_at(s, a);
    if (n == 0) break;
    a += n;
  }
  // From the end: find the last position where a non-space starts, scanning forward (UTF-8 is not
  // reliably decodable backwards when the text may be invalid).
  size_t end = a, i = a;
  while (i < s.size()) {
    const size_t n = space_at(s, i);
    if (n == 0) end = ++i;
    else i += n;
  }
  return s.substr(a, end - a);
}

bool passkey_correct(const std::string& decoded, int key) { return strip_whitespace(decoded) == std::to_string(key); }

std::vector<int64_t> passkey_official_lengths(int64_t max_tokens, int64_t interval) {
  std::vector<int64_t> v;
  for (int64_t i = 0; i < max_tokens / interval; ++i) v.push_back((i + 1) * interval);
  return v;
}

std::vector<double> passkey_official_depths() {
  std::vector<double> v;
  for (int i = 0; i < 10; ++i) v.push_back(i / 10.0);
  return v;
}

void validate_passkey_config(const PasskeyConfig& cfg) {
  if (cfg.lengths.empty()) throw Error("passkey: no context lengths given");
  if (cfg.depths.empty()) throw Error("passkey: no depths given");
  for (int64_t L : cfg.lengths)
    if (L <= 0 || passkey_filler_chars(L) <= 0)
      throw Error("passkey: context length " + std::to_string(L) +
                  " is too short (the filler has floor(3.75 * L / 1000) * 1000 characters; L must be >= 267)");
  for (double d : cfg.depths)
    if (!(d >= 0 && d <= 1)) throw Error("passkey: depth " + std::to_string(d) + " is outside [0, 1]");
  if (cfg.trials < 1) throw Error("passkey: --trials must be at least 1");
}

namespace {

int32_t argmax_row(const std::vector<float>& row) {
  return int32_t(std::max_element(row.begin(), row.end()) - row.begin());
}

// Greedy decode of n_new tokens from `state`, whose last forward produced `logits` (one row).
std::vector<int32_t> greedy_from(const Model& model, State& state, Tensor logits, int n_new) {
  std::vector<float> row(size_t(model.config().n_vocab));
  std::vector<int32_t> out;
  for (int i = 0; i < n_new; ++i) {
    model.backend().to_host(logits, row.data());
    const int32_t t = argmax_row(row);
    out.push_back(t);
    if (i + 1 < n_new) logits = model.forward(&t, SeqBatch::single(1), state, LogitsMode::last);
  }
  return out;
}

}  // namespace

std::vector<int32_t> greedy_continue(const Model& model, const std::vector<int32_t>& prompt, int n_new) {
  if (prompt.empty()) throw Error("greedy_continue: empty prompt");
  State st = model.new_state();
  Tensor l = model.forward(prompt.data(), SeqBatch::single(int64_t(prompt.size())), st, LogitsMode::last);
  return greedy_from(model, st, l, n_new);
}

std::vector<PasskeyCell> run_passkey(const Model& model, const Tokenizer& tok, const PasskeyConfig& cfg,
                                     const std::function<void(const PasskeyCell&)>& progress) {
  validate_passkey_config(cfg);
  std::vector<int> keys;
  for (int t = 0; t < cfg.trials; ++t) keys.push_back(passkey_key(cfg.seed + uint32_t(t)));
  std::vector<PasskeyCell> cells;
  for (int64_t L : cfg.lengths) {
    const int64_t N = passkey_filler_chars(L);
    for (double d : cfg.depths) {
      PasskeyCell cell;
      cell.length_label = L, cell.filler_chars = N, cell.depth = d;
      // The small epsilon keeps depths like 0.7 · 10000 = 7000.000000000001 or 6999.999999999999 on 7000.
      cell.depth_chars = std::min<int64_t>(N, int64_t(std::floor(d * double(N) + 1e-6)));
      std::vector<std::vector<int32_t>> prompts;
      for (int key : keys) prompts.push_back(tok.encode(passkey_prompt(N, cell.depth_chars, key)));
      // Prefill the token prefix shared by every key's prompt once (all but at least one token of each
      // prompt, so every trial still produces its own last-position logits).
      size_t shared = prompts[0].size() - 1;
      for (const auto& p : prompts) {
        shared = std::min(shared, p.size() - 1);
        size_t i = 0;
        while (i < shared && p[i] == prompts[0][i]) ++i;
        shared = i;
      }
      State base = model.new_state();
      if (shared > 0) model.forward(prompts[0].data(), SeqBatch::single(int64_t(shared)), base, LogitsMode::none);
      int correct = 0;
      for (size_t t = 0; t < keys.size(); ++t) {
        State st = model.new_state();
        copy_state_slot(model.backend(), base, 0, st, 0);
        const std::vector<int32_t>& p = prompts[t];
        Tensor l = model.forward(p.data() + shared, SeqBatch::single(int64_t(p.size() - shared)), st, LogitsMode::last);
        PasskeyTrial tr;
        tr.key = keys[t];
        tr.prompt_tokens = int64_t(p.size());
        tr.output = greedy_from(model, st, l, int(tok.encode(std::to_string(keys[t])).size()));
        tr.decoded = tok.decode_compat(tr.output);
        tr.correct = passkey_correct(tr.decoded, tr.key);
        correct += tr.correct;
        cell.trials.push_back(std::move(tr));
      }
      cell.score = 100.0 * correct / double(keys.size());
      if (progress) progress(cell);
      cells.push_back(std::move(cell));
    }
  }
  return cells;
}

}  // namespace rwkvx
