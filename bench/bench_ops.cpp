// Op benchmarks on a backend (today: the fp32 reference). Each reports items/s and FLOP/s so a run can
// be compared with the machine's floor; see BENCHMARKS.md.
//   build/bench/bench_ops --benchmark_filter=wkv7
#include <benchmark/benchmark.h>

#include <random>

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

}  // namespace
}  // namespace rwkvx

BENCHMARK_MAIN();
