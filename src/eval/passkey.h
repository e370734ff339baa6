// Passkey retrieval, the official protocol of spec system.md §5.1 (evaluation/pass_key_rwkvx.py): the
// prompt template and filler, the sweep of context lengths and depths, the numpy-seeded keys, greedy
// decoding of exactly len(encode(str(K))) tokens and exact-match scoring. The engine runs each prompt as
// one prefill plus greedy decode steps (exact MoBA semantics), sharing the prefill of the token prefix
// common to all keys of one (length, depth) cell.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace rwkvx {

class Model;
class Tokenizer;

// The official key for test k: numpy legacy `random.seed(seed); random.randint(1, 50000)`, i.e. the first
// MT19937 output masked to 16 bits, redrawn while above 49998, plus 1 (uniform in [1, 49999]).
int passkey_key(uint32_t seed);

// N = floor(3.75 · L / 1000) · 1000: the filler characters for the context-length label L (≈ L tokens).
int64_t passkey_filler_chars(int64_t length_label);

// The first n characters of G: "The grass is green. ... There and back again." repeated, joined by
// single spaces (the official G has 10,000 repeats; longer prefixes continue the same repetition).
std::string passkey_filler(int64_t n);

// The five-line prompt of §5.1 with G[:depth_chars] before and G[:filler_chars − depth_chars] after the
// key line. Throws rwkvx::Error unless 0 <= depth_chars <= filler_chars.
std::string passkey_prompt(int64_t filler_chars, int64_t depth_chars, int key);

// Python's str.strip() over ASCII whitespace and the Unicode spaces the World vocab can produce.
std::string strip_whitespace(const std::string& s);
// The official scoring: correct iff decode(out).strip() == str(key).
bool passkey_correct(const std::string& decoded, int key);

struct PasskeyConfig {
  std::vector<int64_t> lengths;  // context-length labels L (the §5.1 "Context Length" column)
  std::vector<double> depths;    // fractions of N in [0, 1]; P = floor(depth · N)
  int trials = 5;                // keys per cell: seeds seed, seed + 1, ..., seed + trials − 1
  uint32_t seed = 0;
};

// The official sweep: lengths 2000, 4000, ..., max_tokens and depths 0, 0.1, ..., 0.9.
std::vector<int64_t> passkey_official_lengths(int64_t max_tokens = 32000, int64_t interval = 2000);
std::vector<double> passkey_official_depths();

struct PasskeyTrial {
  int key = 0;
  int64_t prompt_tokens = 0;
  std::vector<int32_t> output;  // the greedy tokens
  std::string decoded;          // decode_compat(output)
  bool correct = false;
};

struct PasskeyCell {
  int64_t length_label = 0, filler_chars = 0, depth_chars = 0;
  double depth = 0;       // the requested fraction
  double score = 0;       // 100 · correct / trials
  std::vector<PasskeyTrial> trials;
};

// Validates the configuration: lengths positive with N > 0, depths in [0, 1], trials >= 1. Throws
// rwkvx::Error naming the bad value.
void validate_passkey_config(const PasskeyConfig& cfg);

// Runs every (length, depth) cell in order, lengths outer; `progress` (optional) is called after each
// cell. Prompts whose tokens exceed the model's vocabulary throw rwkvx::Error.
std::vector<PasskeyCell> run_passkey(const Model& model, const Tokenizer& tok, const PasskeyConfig& cfg,
                                     const std::function<void(const PasskeyCell&)>& progress = {});

// Greedy continuation of `prompt` for `n_new` tokens from a fresh state: one prefill, then one decode
// step per token (argmax, first index on ties). Exposed for tests.
std::vector<int32_t> greedy_continue(const Model& model, const std::vector<int32_t>& prompt, int n_new);

}  // namespace rwkvx
