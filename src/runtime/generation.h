// One generation request as a step machine, shared by the CLI Session and the server's scheduler:
// given the logits of the next position it samples a token, updates penalties, turns tokens into
// UTF-8-safe text pieces (spec system.md §2.1: emit only when the pending tokens decode cleanly) and
// applies the stop rules (stop tokens, stop strings, max tokens). It never runs the model itself, so
// the caller decides how tokens are fed (one sequence, or one row of a continuous batch).
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/sampler.h"

namespace rwkvx {

class Tokenizer;

// Incremental detokenizer of PIPELINE: keeps the tokens since the last emitted piece and emits
// decode_compat(pending) once it contains no U+FFFD (so multi-token characters come out whole).
// Without a tokenizer it emits nothing.
class TextStreamer {
 public:
  explicit TextStreamer(const Tokenizer* tok) : tok_(tok) {}
  std::string push(int32_t token);

 private:
  const Tokenizer* tok_;
  std::vector<int32_t> pending_;
};

// Stop strings over streamed text: text that might be the start of a stop string is held back until
// it is decided. After a stop string appears, the text before it is released and the rest dropped.
class StopStringMatcher {
 public:
  explicit StopStringMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {}
  // Appends `text`; returns what can be emitted now.
  std::string push(std::string_view text);
  // The held-back text, when generation ends without a stop string.
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

enum class FinishReason { none, stop_token, stop_string, length, timeout, cancelled };
// "stop" for stop tokens and strings, "length", "timeout", "cancelled" (OpenAI's finish_reason values
// plus two of ours).
const char* finish_reason_name(FinishReason r);

struct GenerationStep {
  int32_t token = -1;     // the sampled token (a stop token too)
  bool accepted = false;  // true: `token` joins the output and must be fed to the model next
  std::string text;       // text to emit now (may be empty)
};

class Generation {
 public:
  // max_tokens <= 0 finishes at once (length). `weights` as for Sampler.
  Generation(const SamplingParams& params, int64_t max_tokens, int64_t n_vocab, const Tokenizer* tok,
             std::shared_ptr<const std::vector<uint8_t>> weights);

  // One token from the logits of the next position (spec §2.1 loop body). Call only while !finished().
  GenerationStep step(std::span<const float> logits);
  // Ends the generation from outside (timeout, cancel); returns the held-back text to emit.
  std::string finish(FinishReason reason);

  bool finished() const { return reason_ != FinishReason::none; }
  FinishReason reason() const { return reason_; }
  const std::vector<int32_t>& tokens() const { return tokens_; }  // accepted tokens
  const std::string& text() const { return text_; }               // everything emitted so far

 private:
  Sampler sampler_;
  int64_t max_tokens_;
  TextStreamer streamer_;
  StopStringMatcher stops_;
  std::vector<int32_t> tokens_;
  std::string text_;
  FinishReason reason_ = FinishReason::none;
};

}  // namespace rwkvx
