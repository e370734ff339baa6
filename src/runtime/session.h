// A Session is one conversation with a model: a one-slot State, the token history and the logits of
// the next position. Tokens are appended to the history first and fed to the model lazily (prefill),
// so a generation that ends on its token limit does not pay for a forward nobody may need; the next
// prefill, generate or save feeds them. Used by `rwkvx generate` and `rwkvx chat`; the server runs many
// sequences in one State instead (src/server/scheduler.h) but shares the Generation step machine.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "model/model.h"
#include "runtime/generation.h"
#include "runtime/state_file.h"

namespace rwkvx {

class Tokenizer;

struct GenerationResult {
  std::string text;
  std::vector<int32_t> tokens;
  FinishReason reason = FinishReason::none;
};

class Session {
 public:
  // `fingerprint` identifies the model in state files (LoadedModel::fingerprint). `tok` may be null
  // (token ids only, no text); the model and tokenizer must outlive the session.
  Session(const Model& model, std::string fingerprint, const Tokenizer* tok);

  // Forgets everything: zero state, empty history.
  void reset();
  // Appends tokens to the history; they are fed by the next prefill/generate.
  void append(std::span<const int32_t> ids);
  // Feeds every pending token, `chunk` tokens per forward call (a memory knob: results do not depend
  // on it), calling progress(done, total) after each call. Keeps the logits of the last position.
  using Progress = std::function<void(int64_t done, int64_t total)>;
  void prefill(const Progress& progress = {}, int64_t chunk = 512);

  // Generates up to max_tokens after the history (spec §2.1), calling on_text with each clean text
  // piece. `cancel` (optional) is polled between tokens. Accepted tokens join the history.
  GenerationResult generate(const SamplingParams& params, int64_t max_tokens,
                            const std::function<void(const std::string&)>& on_text,
                            const std::atomic<bool>* cancel = nullptr);

  // Saves / loads the whole session (state + history) as a state file (state_file.h).
  void save(const std::string& path) const;
  void load(const std::string& path);

  // Snapshot / restore of the whole session in memory (deep copies of the KV caches).
  struct Snapshot;
  std::shared_ptr<const Snapshot> snapshot() const;
  void restore(const Snapshot& snap);

  const std::vector<int32_t>& tokens() const { return tokens_; }
  int64_t n_pending() const { return n_pending_; }
  const Model& model() const { return model_; }
  const State& state() const { return state_; }
  // Logits of the next position; empty until something was fed.
  const std::vector<float>& last_logits() const { return logits_; }
  // Penalty weights from the tokenizer (spec §2.1), shared by every generation of this session.
  std::shared_ptr<const std::vector<uint8_t>> penalty_weights() const { return weights_; }

 private:
  const Model& model_;
  std::string fingerprint_;
  const Tokenizer* tok_;
  std::shared_ptr<const std::vector<uint8_t>> weights_;
  State state_;
  std::vector<int32_t> tokens_;
  int64_t n_pending_ = 0;
  std::vector<float> logits_;
};

}  // namespace rwkvx
