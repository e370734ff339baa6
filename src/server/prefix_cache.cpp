// LRU prefix-state cache (see prefix_cache.h).
#include "server/prefix_cache.h"

#include <algorithm>

#include "model/state_copy.h"

namespace rwkvx {

PrefixCache::Hit PrefixCache::restore_longest_prefix(std::span<const int32_t> prompt, State& dst, int slot) {
  std::lock_guard<std::mutex> lock(mu_);
  auto best = lru_.end();
  for (auto it = lru_.begin(); it != lru_.end(); ++it) {
    const size_t n = it->tokens.size();
    if (n == 0 || n > prompt.size() || (n == prompt.size() && it->logits.empty())) continue;
    if (best != lru_.end() && n <= best->tokens.size()) continue;
    if (std::equal(it->tokens.begin(), it->tokens.end(), prompt.begin())) best = it;
  }
  Hit hit;
  if (best == lru_.end()) {
    ++misses_;
    return hit;
  }
  copy_state_slot(model_.backend(), best->state, 0, dst, slot);
  hit.n_tokens = int64_t(best->tokens.size());
  if (best->tokens.size() == prompt.size()) hit.logits = best->logits;
  lru_.splice(lru_.begin(), lru_, best);
  ++hits_;
  hit_tokens_ += uint64_t(hit.n_tokens);
  return hit;
}

void PrefixCache::insert(std::span<const int32_t> tokens, const State& src, int slot, std::vector<float> logits) {
  if (tokens.empty() || budget_ == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = lru_.begin(); it != lru_.end(); ++it) {
    if (it->tokens.size() == tokens.size() && std::equal(tokens.begin(), tokens.end(), it->tokens.begin())) {
      if (it->logits.empty() && !logits.empty()) it->logits = std::move(logits);
      lru_.splice(lru_.begin(), lru_, it);
      return;
    }
  }
  Entry e;
  e.tokens.assign(tokens.begin(), tokens.end());
  e.state = model_.new_state(1);
  copy_state_slot(model_.backend(), src, slot, e.state, 0);
  e.logits = std::move(logits);
  e.bytes = state_slot_bytes(e.state, 0) + e.tokens.size() * sizeof(int32_t) + e.logits.size() * sizeof(float);
  if (e.bytes > budget_) return;
  bytes_ += e.bytes;
  lru_.push_front(std::move(e));
  while (bytes_ > budget_) {
    bytes_ -= lru_.back().bytes;
    lru_.pop_back();
  }
}

PrefixCache::Stats PrefixCache::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {lru_.size(), bytes_, budget_, hits_, misses_, hit_tokens_};
}

}  // namespace rwkvx
