// Fresh random models for tests, loaded through the real safetensors parser (in memory), and helpers
// to run and compare them.
#pragma once
#include <algorithm>
#include <memory>
#include <random>
#include <vector>

#include "model/formats/tensor_store.h"
#include "model/model.h"
#include "model/random_init.h"
#include "support/test_util.h"

namespace rwkvx::test {

inline std::unique_ptr<Model> load_random_model(const RandomModelSpec& spec, const ModelOptions& opt, Backend& be) {
  auto file = MappedFile::from_bytes("random-model.safetensors", serialize_safetensors(make_random_model(spec)));
  TensorStore store = parse_safetensors(file);
  return Model::from_store(store, opt, be);
}

inline std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = int32_t(rng() % uint64_t(vocab));
  return ids;
}

inline std::vector<float> host(Backend& be, const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  if (!v.empty()) be.to_host(t, v.data());
  return v;
}

// Runs `ids` as consecutive calls of the given sizes; returns logits of every position.
inline std::vector<float> run_pieces(const Model& m, State& st, const std::vector<int32_t>& ids,
                                     const std::vector<int64_t>& pieces) {
  std::vector<float> all;
  int64_t t0 = 0;
  for (int64_t n : pieces) {
    Tensor l = m.forward(ids.data() + t0, SeqBatch::single(n), st, LogitsMode::all);
    std::vector<float> h = host(m.backend(), l);
    all.insert(all.end(), h.begin(), h.end());
    t0 += n;
  }
  return all;
}

// Largest relative difference over every tensor of two single-slot states (KV caches included).
inline double state_diff(Backend& be, const State& a, const State& b) {
  double worst = 0;
  auto cmp = [&](const Tensor& x, const Tensor& y) { worst = std::max(worst, rel_max_err(host(be, x), host(be, y))); };
  for (size_t i = 0; i < a.wkv.size(); ++i) cmp(a.wkv[i], b.wkv[i]), cmp(a.att_shift[i], b.att_shift[i]);
  for (size_t i = 0; i < a.ffn_shift.size(); ++i) cmp(a.ffn_shift[i], b.ffn_shift[i]);
  for (size_t m = 0; m < a.kv.size(); ++m) {
    const KvCache &x = a.kv[m][0], &y = b.kv[m][0];
    if (x.len != y.len || x.n_chunks != y.n_chunks) return INFINITY;
    if (x.len == 0) continue;
    cmp(x.k.rows_view(0, x.len), y.k.rows_view(0, y.len));
    cmp(x.v.rows_view(0, x.len), y.v.rows_view(0, y.len));
    if (x.n_chunks) cmp(x.chunk_mean.rows_view(0, x.n_chunks), y.chunk_mean.rows_view(0, y.n_chunks));
  }
  if (a.pos != b.pos) return INFINITY;
  return worst;
}

}  // namespace rwkvx::test
