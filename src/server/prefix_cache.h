// Prefix-state cache of the server: states of token sequences the server has already run (a prompt
// just after its prefill, a whole conversation after its reply), so a request whose prompt starts with
// one of them restores that state and prefills only the rest. RWKV's state has a fixed size (plus the
// KV caches of the sparse blocks), which makes this cheap compared with transformer prefix caching.
// Entries are evicted least-recently-used to stay within a byte budget. Thread-safe.
#pragma once
#include <cstdint>
#include <list>
#include <mutex>
#include <span>
#include <vector>

#include "model/model.h"

namespace rwkvx {

class PrefixCache {
 public:
  PrefixCache(const Model& model, size_t budget_bytes) : model_(model), budget_(budget_bytes) {}

  struct Hit {
    int64_t n_tokens = 0;       // prompt tokens covered by the restored state (0 = miss)
    std::vector<float> logits;  // logits of the next position when the whole prompt was covered
  };
  // Finds the longest cached sequence that is a prefix of `prompt` and copies its state into `slot` of
  // `dst`. A sequence equal to the whole prompt qualifies only if its entry kept the next logits (the
  // first token must be sampled from something). On a miss `dst` is untouched.
  Hit restore_longest_prefix(std::span<const int32_t> prompt, State& dst, int slot);

  // Stores a copy of `slot` of `src` as the state after `tokens` (with the next logits if known).
  // An equal sequence already cached is refreshed instead; an entry bigger than the budget is skipped.
  void insert(std::span<const int32_t> tokens, const State& src, int slot, std::vector<float> logits = {});

  struct Stats {
    size_t entries = 0, bytes = 0, budget = 0;
    uint64_t hits = 0, misses = 0, hit_tokens = 0;
  };
  Stats stats() const;

 private:
  struct Entry {
    std::vector<int32_t> tokens;
    State state;
    std::vector<float> logits;
    size_t bytes = 0;
  };
  const Model& model_;
  size_t budget_;
  mutable std::mutex mu_;
  std::list<Entry> lru_;  // most recently used first
  size_t bytes_ = 0;
  uint64_t hits_ = 0, misses_ = 0, hit_tokens_ = 0;
};

}  // namespace rwkvx
