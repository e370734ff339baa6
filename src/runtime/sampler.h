// Token sampling exactly as the official PIPELINE does it (spec system.md §2): token bans, presence and
// frequency penalties with decay (§2.1), then sample_logits (§2.2: softmax, top-p cutoff, top-k,
// temperature on the truncated probabilities, multinomial draw). Differences, all [REC] of the spec:
// the RNG is a seeded per-request std::mt19937_64 (reproducible, not torch-compatible), and in native
// mode (the default) top_p >= 1 means "off" instead of the float32 rounding quirk (compat_top_p keeps it).
#pragma once
#include <cstdint>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace rwkvx {

class Tokenizer;

struct SamplingParams {
  // Defaults are PIPELINE_ARGS' (spec §2 table).
  float temperature = 1.0f;        // 0 = greedy (spec §2.2 step 1)
  float top_p = 0.85f;             // nucleus mass kept; >= 1 = off (native mode)
  int top_k = 0;                   // 0 = off
  float presence_penalty = 0.2f;   // alpha_presence
  float frequency_penalty = 0.2f;  // alpha_frequency
  float penalty_decay = 0.996f;    // alpha_decay: occurrence counts shrink by this factor per token
  std::vector<int32_t> ban_tokens;    // logits set to -inf
  std::vector<int32_t> stop_tokens;   // generation ends when one is sampled; it is not emitted
  std::vector<std::string> stop_strings;  // generation ends before the first occurrence in the text
  uint64_t seed = 0;
  bool compat_top_p = false;  // replicate the official top_p = 1.0 float32 quirk (spec §2.2 step 3)

  // Throws rwkvx::Error naming the field: negative or non-finite values, top_p outside [0, 1],
  // decay outside [0, 1], ids outside [0, n_vocab), empty stop strings.
  void validate(int64_t n_vocab) const;
};

// Per-token occurrence weights for the penalties (spec §2.1): 0 for tokens whose text is a substring of
// " \t0123456789" (spaces, tabs, digits, "01" ... "89"), 1 for all others. Computed once per tokenizer;
// `n_vocab` is the model's vocabulary (ids the tokenizer lacks get weight 1).
std::vector<uint8_t> penalty_weights(const Tokenizer& tok, int64_t n_vocab);

// One request's sampler: its parameters, its RNG and its occurrence table. Not thread-safe; the server
// keeps one per request.
class Sampler {
 public:
  // `weights` from penalty_weights(); null means weight 1 for every token (no tokenizer at hand).
  Sampler(SamplingParams params, int64_t n_vocab, std::shared_ptr<const std::vector<uint8_t>> weights = nullptr);

  const SamplingParams& params() const { return params_; }

  // Bans and penalties applied in place to one row of logits (spec §2.1, before sample_logits).
  void apply_penalties(std::span<float> logits) const;

  // The distribution sample_logits draws from, normalised: softmax, top-p, top-k, temperature (§2.2
  // steps 1-5). Exposed so tests can compare it with hand-computed probabilities. Throws rwkvx::Error
  // if every token is banned.
  std::vector<float> distribution(std::span<const float> logits) const;

  // apply_penalties on a copy, then a draw from distribution() with this sampler's RNG.
  int32_t sample(std::span<const float> logits);

  // Records a generated token (not a stop token): decays every occurrence, then adds the token's weight
  // (spec §2.1; an entry of weight 0 still exists, so the presence penalty applies to it).
  void accept(int32_t token);

  bool is_stop_token(int32_t token) const;

 private:
  SamplingParams params_;
  int64_t n_vocab_;
  std::shared_ptr<const std::vector<uint8_t>> weights_;
  std::mt19937_64 rng_;
  std::vector<float> occurrence_;   // [n_vocab] dense counts
  std::vector<int32_t> occurred_;   // ids with an entry, in first-seen order
  std::vector<uint8_t> has_entry_;  // [n_vocab]
};

}  // namespace rwkvx
