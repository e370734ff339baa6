// PIPELINE sampling (spec system.md §2.1 penalties, §2.2 sample_logits), step by step in the spec's order.
#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string_view>

#include "core/error.h"
#include "runtime/tokenizer.h"

namespace rwkvx {

void SamplingParams::validate(int64_t n_vocab) const {
  auto check = [](bool ok, const std::string& msg) {
    if (!ok) throw Error(msg);
  };
  check(std::isfinite(temperature) && temperature >= 0,
        "temperature must be a finite number >= 0 (0 = greedy), got " + std::to_string(temperature));
  check(std::isfinite(top_p) && top_p >= 0 && top_p <= 1, "top_p must be in [0, 1], got " + std::to_string(top_p));
  check(top_k >= 0, "top_k must be >= 0 (0 = off), got " + std::to_string(top_k));
  check(std::isfinite(presence_penalty), "presence_penalty must be a finite number");
  check(std::isfinite(frequency_penalty), "frequency_penalty must be a finite number");
  check(std::isfinite(penalty_decay) && penalty_decay >= 0 && penalty_decay <= 1,
        "penalty_decay must be in [0, 1], got " + std::to_string(penalty_decay));
  for (int32_t id : ban_tokens)
    check(id >= 0 && id < n_vocab, "banned token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                       std::to_string(n_vocab) + ")");
  for (int32_t id : stop_tokens)
    check(id >= 0 && id < n_vocab, "stop token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                       std::to_string(n_vocab) + ")");
  for (const std::string& s : stop_strings) check(!s.empty(), "stop strings must not be empty");
}

std::vector<uint8_t> penalty_weights(const Tokenizer& tok, int64_t n_vocab) {
  static constexpr std::string_view kWeightZero = " \t0123456789";
  std::vector<uint8_t> w(size_t(n_vocab), 1);
  for (int64_t id = 1; id < n_vocab && size_t(id) < tok.vocab_size(); ++id) {
    if (!tok.has_token(int32_t(id))) continue;
    const int32_t one[1] = {int32_t(id)};
    // The spec's test is on decode_compat's output: a token that is not valid UTF-8 on its own decodes
    // to U+FFFD, which is no substring of kWeightZero.
    const std::string text = tok.decode_compat(one);
    if (!text.empty() && kWeightZero.find(text) != std::string_view::npos) w[size_t(id)] = 0;
  }
  return w;
}

Sampler::Sampler(SamplingParams params, int64_t n_vocab, std::shared_ptr<const std::vector<uint8_t>> weights)
    : params_(std::move(params)),
      n_vocab_(n_vocab),
      weights_(std::move(weights)),
      rng_(params_.seed),
      occurrence_(size_t(n_vocab), 0.0f),
      has_entry_(size_t(n_vocab), 0) {
  params_.validate(n_vocab);
  RWKVX_ASSERT(!weights_ || int64_t(weights_->size()) == n_vocab, "penalty weights sized for another vocabulary");
}

bool Sampler::is_stop_token(int32_t token) const {
  return std::find(params_.stop_tokens.begin(), params_.stop_tokens.end(), token) != params_.stop_tokens.end();
}

void Sampler::apply_penalties(std::span<float> logits) const {
  RWKVX_ASSERT(int64_t(logits.size()) == n_vocab_, "logits row has the wrong size");
  for (int32_t n : params_.ban_tokens) logits[size_t(n)] = -std::numeric_limits<float>::infinity();
  for (int32_t n : occurred_)
    logits[size_t(n)] -= params_.presence_penalty + occurrence_[size_t(n)] * params_.frequency_penalty;
}

std::vector<float> Sampler::distribution(std::span<const float> logits) const {
  const int64_t V = int64_t(logits.size());
  RWKVX_ASSERT(V == n_vocab_, "logits row has the wrong size");
  // Step 1: temperature 0 is greedy: temperature 1 and a top-p cutoff at the largest probability.
  float temperature = params_.temperature, top_p = params_.top_p;
  if (temperature == 0) temperature = 1, top_p = 0;

  // Step 2: softmax in float32 (double accumulation for the sum).
  float mx = -std::numeric_limits<float>::infinity();
  for (float l : logits) mx = std::max(mx, std::isnan(l) ? mx : l);
  if (mx == -std::numeric_limits<float>::infinity())
    throw Error("cannot sample: every token is banned or has probability 0");
  std::vector<float> p(static_cast<size_t>(V));
  double sum = 0;
  for (int64_t i = 0; i < V; ++i) {
    const float l = logits[size_t(i)];
    p[size_t(i)] = std::isnan(l) ? 0.0f : float(std::exp(double(l) - double(mx)));
    sum += p[size_t(i)];
  }
  for (float& v : p) v = float(double(v) / sum);

  // Descending order by probability, ties by lower id first (the spec's argsort, reversed; bit parity
  // with numpy's unstable quicksort on ties is a non-goal). Only the head of the order is ever needed,
  // so it is sorted lazily: the first `sorted` entries are final.
  std::vector<int32_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  int64_t sorted = 0;
  auto sort_head = [&](int64_t m) {
    m = std::min(m, V);
    if (m <= sorted) return;
    std::partial_sort(order.begin(), order.begin() + m, order.end(), [&](int32_t a, int32_t b) {
      return p[size_t(a)] != p[size_t(b)] ? p[size_t(a)] > p[size_t(b)] : a < b;
    });
    sorted = m;
  };

  // Step 3: top-p. j = first index where the float32 cumulative sum reaches top_p (0 if none does);
  // everything below sp[j] is dropped, ties with it survive. Native mode: top_p >= 1 keeps everything.
  const bool use_top_p = params_.compat_top_p || top_p < 1.0f;
  float cutoff = 0;
  if (use_top_p) {
    int64_t j = -1;
    for (int64_t m = 64;; m *= 2) {
      sort_head(m);
      float c = 0;
      for (int64_t i = 0; i < sorted; ++i) {
        c += p[size_t(order[size_t(i)])];
        if (c >= top_p) {
          j = i;
          break;
        }
      }
      if (j >= 0 || sorted == V) break;
    }
    if (j < 0) j = 0;  // numpy argmax over all-False: the official quirk
    cutoff = p[size_t(order[size_t(j)])];
  }

  // Step 4: top-k keeps the first top_k entries of the order (computed on the untruncated p).
  std::vector<uint8_t> keep(size_t(V), 1);
  if (params_.top_k > 0 && params_.top_k < V) {
    sort_head(params_.top_k);
    std::fill(keep.begin(), keep.end(), 0);
    for (int64_t i = 0; i < params_.top_k; ++i) keep[size_t(order[size_t(i)])] = 1;
  }
  for (int64_t i = 0; i < V; ++i)
    if (!keep[size_t(i)] || (use_top_p && p[size_t(i)] < cutoff)) p[size_t(i)] = 0;

  // Step 5: temperature on the kept probabilities, p^(1/T). Scaling by the largest kept p first is the
  // same distribution after normalisation and keeps small temperatures from underflowing to all zeros.
  if (temperature != 1.0f) {
    float pmax = 0;
    for (float v : p) pmax = std::max(pmax, v);
    const double inv_t = 1.0 / double(temperature);
    for (float& v : p)
      if (v > 0) v = float(std::pow(double(v) / double(pmax), inv_t));
  }
  // Step 6's normalisation (numpy's random.choice path).
  sum = 0;
  for (float v : p) sum += v;
  RWKVX_ASSERT(sum > 0, "sampling distribution has no mass");
  for (float& v : p) v = float(double(v) / sum);
  return p;
}

int32_t Sampler::sample(std::span<const float> logits) {
  std::vector<float> l(logits.begin(), logits.end());
  apply_penalties(l);
  const std::vector<float> p = distribution(l);
  // A uniform double in [0, 1) from the top 53 bits: portable, unlike std::uniform_real_distribution.
  const double u = double(rng_() >> 11) * 0x1.0p-53;
  double total = 0;
  for (float v : p) total += v;
  double acc = 0;
  int32_t last_nonzero = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] <= 0) continue;
    last_nonzero = int32_t(i);
    acc += p[i];
    if (acc > u * total) return int32_t(i);
  }
  return last_nonzero;
}

void Sampler::accept(int32_t token) {
  RWKVX_ASSERT(token >= 0 && token < n_vocab_, "accepted token outside the vocabulary");
  for (int32_t n : occurred_) occurrence_[size_t(n)] *= params_.penalty_decay;
  const float w = weights_ ? float((*weights_)[size_t(token)]) : 1.0f;
  occurrence_[size_t(token)] += w;
  if (!has_entry_[size_t(token)]) {
    has_entry_[size_t(token)] = 1;
    occurred_.push_back(token);
  }
}

}  // namespace rwkvx
