// The small models of the training tests (CPU gradient checks, CUDA model and data-parallel tests).
// tiny_train_model: an RWKV-X of C = 64, 2 RWKV blocks (4 heads of 16) and 2 sparse blocks in the order
// R0 M0 R1 M1 with 4 sparse heads of 16, chunk 3 and top-3: with 16 tokens (or 14 left-padded to 16),
// 5 complete chunks, and queries from position 9 on choose 2 of >= 3 past chunks per head. WKV snapshots
// every 5 tokens, so the segment recomputation of the backward is exercised.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

#include "model/random_init.h"
#include "train/train_model.h"

namespace rwkvx::test {

inline RandomModelSpec tiny_train_spec(uint64_t seed) {
  RandomModelSpec s;
  s.n_vocab = 24, s.n_embd = 64, s.head_size = 16, s.n_rwkv = 2, s.n_sparse = 2;
  s.dim_w = s.dim_a = s.dim_v = s.dim_g = 8;
  s.seed = seed;
  return s;
}

template <class S>
train::TrainModelT<S> tiny_train_model(uint64_t seed) {
  ModelOptions o;
  o.chunk = 3;
  o.top_k = 3;
  train::TrainModelT<S> m = train::TrainModelT<S>::random(tiny_train_spec(seed), o);
  m.config().sparse.head_dim = 16;
  m.wkv_save_every = 5;
  return m;
}

// A model with realistic head sizes (64) for the fp32 and bf16 comparisons of the CUDA trainer: C = 128,
// 2 RWKV blocks + 1 sparse block, V = 300, chunk 16, top-3.
inline train::TrainModel small_train_model(uint64_t seed) {
  RandomModelSpec s;
  s.n_vocab = 300, s.n_embd = 128, s.head_size = 64, s.n_rwkv = 2, s.n_sparse = 1;
  s.seed = seed;
  ModelOptions o;
  o.chunk = 16;
  o.top_k = 3;
  return train::TrainModel::random(s, o);
}

// T random tokens below V as inputs, and the same shifted by one as targets.
struct TokenSequence {
  std::vector<int32_t> ids, targets;
};

inline TokenSequence random_sequence(int64_t T, int64_t V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  TokenSequence s;
  for (int64_t t = 0; t <= T; ++t) s.ids.push_back(int32_t(rng() % uint64_t(V)));
  s.targets.assign(s.ids.begin() + 1, s.ids.end());
  s.ids.pop_back();
  return s;
}

}  // namespace rwkvx::test
