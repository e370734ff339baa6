// Op benchmarks: the fp32 reference (BM_*) and the fast CPU backend on one thread (BM_cpu_*). Each
// reports items/s and FLOP/s or bytes/s so a run can be compared with the machine's floor; see BENCHMARKS.md.
//   build/bench/bench_ops --benchmark_filter=cpu_
#include <benchmark/benchmark.h>

#include <cstring>
#include <random>

#include "backend/cpu/cpu_backend.h"
#include "backend/ops.h"

namespace rwkvx {
namespace {

Tensor random_tensor(Backend& be, std::initializer_list<int64_t> shape, float scale, uint32_t seed) {
  Tensor t = be.alloc(DType::f32, shape);
  std::vector<float> v(static_cast<size_t>(t.numel()));
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, scale);
  for (float& x : v) x = nd(rng);
  be.from_host(v.data(), t);
  return t;
}

void BM_linear(benchmark::State& st) {
  auto be = make_reference_backend();
  const int64_t T = st.range(0), C = st.range(1);
  Tensor x = random_tensor(*be, {T, C}, 1, 1), W = random_tensor(*be, {C, C}, 0.03f, 2), y = be->alloc(DType::f32, {T, C});
  for (auto _ : st) be->linear(x, W, y);
  st.counters["FLOP/s"] = benchmark::Counter(double(2 * T * C * C), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_linear)->Args({1, 768})->Args({64, 768});

void BM_wkv7(benchmark::State& st) {
  auto be = make_reference_backend();
  const int64_t T = st.range(0), C = st.range(1), N = 64;
  Tensor r = random_tensor(*be, {T, C}, 1, 1), k = random_tensor(*be, {T, C}, 0.1f, 2), v = random_tensor(*be, {T, C}, 1, 3);
  Tensor w = be->alloc(DType::f32, {T, C}), a = random_tensor(*be, {T, C}, 0.1f, 4), b = random_tensor(*be, {T, C}, 0.1f, 5);
  std::vector<float> ones(static_cast<size_t>(T * C), 0.97f);
  be->from_host(ones.data(), w);
  Tensor state = be->alloc(DType::f32, {1, C / N, N, N}), y = be->alloc(DType::f32, {T, C});
  SeqBatch batch = SeqBatch::single(T);
  for (auto _ : st) be->wkv7(r, w, k, v, a, b, state, batch, y, int(N));
  st.SetItemsProcessed(st.iterations() * T);
}
BENCHMARK(BM_wkv7)->Args({1, 768})->Args({256, 768});

void BM_sparse_attention_decode(benchmark::State& st) {
  auto be = make_reference_backend();
  const int64_t L = st.range(0), C = 768;
  SparseAttnParams p;
  KvCache cache;
  be->kv_append(cache, random_tensor(*be, {L, C}, 1, 1), random_tensor(*be, {L, C}, 1, 2), p.chunk);
  Tensor q = random_tensor(*be, {1, C}, 1, 3), out = be->alloc(DType::f32, {1, C});
  for (auto _ : st) be->sparse_attention(q, cache, p, out);
  st.SetItemsProcessed(st.iterations());
}
BENCHMARK(BM_sparse_attention_decode)->Arg(8192)->Arg(65536);

// ---- fast CPU backend, one thread ---------------------------------------------------------------------
std::unique_ptr<Backend> cpu_backend(bool int8) {
  CpuBackendOptions o;
  o.n_threads = 1;
  o.quantize_int8 = int8;
  return make_cpu_backend(o);
}

// x [T, 768] · Wᵀ with W [3072, 768] (the channel-mix key shape) stored bf16, or quantized to int8.
void BM_cpu_linear(benchmark::State& st) {
  const int64_t T = st.range(0), K = 768, N = 3072;
  const bool int8 = st.range(1) != 0;
  auto be = cpu_backend(int8);
  std::vector<uint16_t> bits(static_cast<size_t>(N * K));
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 0.03f);
  for (auto& b : bits) b = f32_to_bf16(nd(rng));
  StoredTensor src;
  src.name = "blocks.0.ffn.key.weight";
  src.dtype = DType::bf16;
  src.shape = {N, K};
  src.data = reinterpret_cast<const uint8_t*>(bits.data());
  Tensor W = be->upload_weight(src, {N, K});
  Tensor x = random_tensor(*be, {T, K}, 1, 2), y = be->alloc(DType::f32, {T, N});
  for (auto _ : st) be->linear(x, W, y);
  st.counters["FLOP/s"] = benchmark::Counter(double(2 * T * K * N), benchmark::Counter::kIsIterationInvariantRate);
  st.counters["weight B/s"] =
      benchmark::Counter(double(N * K * (int8 ? 1 : 2)), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_cpu_linear)->ArgNames({"T", "int8"})->Args({1, 0})->Args({1, 1})->Args({512, 0})->Args({512, 1});

// The last `queries` queries of a prefill of `context` tokens through one sparse-attention layer (C = 768,
// chunk 2048, top-k 3): per-query cost should level off once every query has 2 past chunks to choose.
// FLOP/s counts 4·C per (query, attended key): the score and weighted-value products of every head.
void BM_cpu_sparse_attention_prefill(benchmark::State& st) {
  const int64_t L = st.range(0), T = st.range(1), C = 768;
  auto be = cpu_backend(false);
  SparseAttnParams p;
  KvCache cache;
  be->kv_append(cache, random_tensor(*be, {L, C}, 1, 1), random_tensor(*be, {L, C}, 1, 2), p.chunk);
  Tensor q = random_tensor(*be, {T, C}, 1, 3), out = be->alloc(DType::f32, {T, C});
  double keys = 0;
  for (int64_t t = L - T; t < L; ++t) keys += double(t % p.chunk + 1 + std::min<int64_t>(p.top_k - 1, t / p.chunk) * p.chunk);
  for (auto _ : st) be->sparse_attention(q, cache, p, out);
  st.SetItemsProcessed(st.iterations() * T);
  st.counters["FLOP/s"] = benchmark::Counter(4 * double(C) * keys, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_cpu_sparse_attention_prefill)
    ->ArgNames({"context", "queries"})
    ->Args({4096, 512})
    ->Args({65536, 512})
    ->Args({4096, 4096})
    ->Args({65536, 8192});

}  // namespace
}  // namespace rwkvx

BENCHMARK_MAIN();
