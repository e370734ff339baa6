// The generation step machine: sampling, streaming detokenization and stop rules (spec system.md §2.1).
#include "runtime/generation.h"

#include <algorithm>

#include "core/error.h"
#include "runtime/tokenizer.h"

namespace rwkvx {

namespace {
constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD in UTF-8
}

std::string TextStreamer::push(int32_t token) {
  if (!tok_) return {};
  pending_.push_back(token);
  std::string s = tok_->decode_compat(pending_);
  if (s.find(kReplacementChar) != std::string::npos) return {};
  pending_.clear();
  return s;
}

std::string StopStringMatcher::push(std::string_view text) {
  if (stopped_) return {};
  held_.append(text);
  // The earliest complete stop string wins.
  size_t first = std::string::npos;
  for (const std::string& s : stops_) first = std::min(first, held_.find(s));
  if (first != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, first);
    held_.clear();
    return out;
  }
  // Hold back the longest suffix that is a proper prefix of some stop string.
  size_t hold = 0;
  for (const std::string& s : stops_)
    for (size_t n = std::min(s.size() - 1, held_.size()); n > hold; --n)
      if (held_.compare(held_.size() - n, n, s, 0, n) == 0) {
        hold = n;
        break;
      }
  std::string out = held_.substr(0, held_.size() - hold);
  held_.erase(0, held_.size() - hold);
  return out;
}

std::string StopStringMatcher::flush() {
  std::string out = stopped_ ? std::string() : held_;
  held_.clear();
  return out;
}

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::stop_token:
    case FinishReason::stop_string: return "stop";
    case FinishReason::length: return "length";
    case FinishReason::timeout: return "timeout";
    case FinishReason::cancelled: return "cancelled";
    case FinishReason::none: break;
  }
  return "none";
}

Generation::Generation(const SamplingParams& params, int64_t max_tokens, int64_t n_vocab, const Tokenizer* tok,
                       std::shared_ptr<const std::vector<uint8_t>> weights)
    : sampler_(params, n_vocab, std::move(weights)),
      max_tokens_(max_tokens),
      streamer_(tok),
      stops_(params.stop_strings) {
  if (max_tokens_ <= 0) reason_ = FinishReason::length;
}

GenerationStep Generation::step(std::span<const float> logits) {
  RWKVX_ASSERT(!finished(), "Generation::step after the generation finished");
  GenerationStep st;
  st.token = sampler_.sample(logits);
  if (sampler_.is_stop_token(st.token)) {
    // The stop token is neither emitted nor fed (spec §2.1).
    st.text = stops_.flush();
    reason_ = FinishReason::stop_token;
  } else {
    st.accepted = true;
    tokens_.push_back(st.token);
    sampler_.accept(st.token);
    st.text = stops_.push(streamer_.push(st.token));
    if (stops_.stopped()) {
      reason_ = FinishReason::stop_string;
    } else if (int64_t(tokens_.size()) >= max_tokens_) {
      st.text += stops_.flush();
      reason_ = FinishReason::length;
    }
  }
  text_ += st.text;
  return st;
}

std::string Generation::finish(FinishReason reason) {
  if (finished()) return {};
  reason_ = reason;
  std::string out = stops_.flush();
  text_ += out;
  return out;
}

}  // namespace rwkvx
