#include "runtime/benchmark.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "backend/cpu/cpu_backend.h"
#include "core/thread_pool.h"

namespace rwkvx {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

std::vector<int32_t> bench_tokens(int64_t n, int64_t vocab) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  uint64_t x = 88172645463325252ull;
  for (auto& id : ids) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    id = int32_t(x % uint64_t(vocab));
  }
  return ids;
}

size_t weight_bytes(const Tensor& t) {
  if (t.empty()) return 0;
  return t.dtype == DType::q8 ? size_t(t.numel()) + size_t(t.rows()) * 4 : t.nbytes();
}

}  // namespace

int64_t peak_rss_mb() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss / 1024;
}

MachineFloors measure_machine_floors(int threads) {
  ThreadPool pool(threads);
  const cpu::Kernels& k = cpu::kernels_for(active_isa());
  MachineFloors f;
  f.threads = pool.size();
  f.isa = isa_name(k.isa);
  // Bandwidth: each thread streams its own 256 MiB (well beyond the caches); best of 5 passes.
  const size_t per_thread = size_t(256) << 20;
  std::vector<std::vector<float>> bufs(size_t(f.threads));
  pool.run([&](int t, int) { bufs[size_t(t)].assign(per_thread / 4, 1.0f); });
  double best = 0;
  for (int pass = 0; pass < 5; ++pass) {
    std::vector<float> sums(size_t(f.threads));
    auto t0 = Clock::now();
    pool.run([&](int t, int) {
      const float* p = bufs[size_t(t)].data();
      const int64_t n = int64_t(per_thread / 4);
      float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (int64_t i = 0; i < n; i += 64) s0 += p[i], s1 += p[i + 16], s2 += p[i + 32], s3 += p[i + 48];
      // Touching one float per cache line (64 B) reads every line: the loop is bandwidth-bound.
      sums[size_t(t)] = s0 + s1 + s2 + s3;
    });
    const double dt = seconds_since(t0);
    if (sums[0] < 0) f.mem_gbps = -1;  // keeps the sums alive
    best = std::max(best, double(per_thread) * f.threads / dt / 1e9);
  }
  f.mem_gbps = best;
  // Peak: every thread runs the register-only FMA loop.
  const int64_t iters = 20'000'000;
  double best_peak = 0;
  for (int pass = 0; pass < 3; ++pass) {
    std::vector<float> sink(size_t(f.threads));
    auto t0 = Clock::now();
    pool.run([&](int t, int) { sink[size_t(t)] = k.fma_peak(iters); });
    const double dt = seconds_since(t0);
    best_peak = std::max(best_peak, 2.0 * double(iters) * cpu::kFmaPeakChains * k.lanes * f.threads / dt / 1e9);
  }
  f.peak_gflops = best_peak;
  if (k.tile_peak) {
    const int64_t tile_iters = 2'000'000;
    for (int pass = 0; pass < 3; ++pass) {
      std::vector<float> sink(size_t(f.threads));
      auto t0 = Clock::now();
      pool.run([&](int t, int) { sink[size_t(t)] = k.tile_peak(tile_iters); });
      const double dt = seconds_since(t0);
      f.tile_peak_gflops = std::max(f.tile_peak_gflops, double(tile_iters) * cpu::kTilePeakFlops * f.threads / dt / 1e9);
    }
  }
  return f;
}

double ModelCost::attention_flops(int64_t t0, int64_t t1) const {
  if (n_sparse == 0) return 0;
  double keys = 0;
  for (int64_t t = t0; t < t1; ++t) keys += double(t % chunk + 1) + double(std::min<int64_t>(top_k - 1, t / chunk) * chunk);
  return keys * 4.0 * double(n_embd) * double(n_sparse);
}

ModelCost count_model_cost(const Model& model) {
  const ModelConfig& c = model.config();
  const ModelWeights& w = model.weights();
  ModelCost cost;
  double body = 0, body_bytes = 0;
  auto add = [&](const Tensor& t) {
    if (t.empty()) return;
    body += double(t.numel());
    body_bytes += double(weight_bytes(t));
  };
  for (const RwkvBlockWeights& b : w.rwkv) {
    const TimeMixWeights& a = b.att;
    for (const Tensor* t : {&a.w1, &a.w2, &a.a1, &a.a2, &a.v1, &a.v2, &a.g1, &a.g2, &a.receptance, &a.key, &a.value,
                            &a.output, &b.ffn.key, &b.ffn.value})
      add(*t);
  }
  for (const SparseBlockWeights& b : w.sparse)
    for (const Tensor* t : {&b.query, &b.key, &b.value, &b.output, &b.ffn.key, &b.ffn.value}) add(*t);
  cost.matrix_flops_per_token = 2.0 * body;
  cost.wkv_flops_per_token = 10.0 * double(c.head_size) * double(c.n_embd) * double(c.n_rwkv);
  cost.decode_weight_bytes = body_bytes + double(weight_bytes(w.head)) + double(weight_bytes(w.emb)) / double(c.n_vocab);
  cost.state_bytes = 2.0 * 4.0 * double(c.n_rwkv) * double(c.n_head) * double(c.head_size * c.head_size);
  cost.n_sparse = c.n_sparse, cost.n_embd = c.n_embd, cost.chunk = c.sparse.chunk, cost.top_k = c.sparse.top_k;
  return cost;
}

PrefillResult bench_prefill(const Model& model, const ModelCost& cost, const MachineFloors& floors, int64_t tokens,
                            int64_t slice, int repeat, const ProgressFn& progress) {
  const std::vector<int32_t> ids = bench_tokens(tokens, model.config().n_vocab);
  std::vector<float> last_logits(static_cast<size_t>(model.config().n_vocab));
  std::vector<double> times;
  for (int r = 0; r < std::max(1, repeat); ++r) {
    State st = model.new_state();
    auto t0 = Clock::now();
    for (int64_t i = 0; i < tokens; i += slice) {
      const int64_t n = std::min(slice, tokens - i);
      Tensor logits =
          model.forward(ids.data() + i, SeqBatch::single(n), st, i + n == tokens ? LogitsMode::last : LogitsMode::none);
      // Reading the last logits back waits for every queued op (asynchronous backends such as CUDA).
      if (i + n == tokens) model.backend().to_host(logits, last_logits.data());
      if (progress) progress(i + n, tokens);
    }
    times.push_back(seconds_since(t0));
  }
  PrefillResult res;
  res.tokens = tokens;
  res.seconds = median(times);
  res.tokens_per_s = double(tokens) / res.seconds;
  const double flops = (cost.matrix_flops_per_token + cost.wkv_flops_per_token) * double(tokens) +
                       cost.attention_flops(0, tokens);
  res.gflops = flops / res.seconds / 1e9;
  res.ratio_to_peak = floors.peak_gflops > 0 ? res.gflops / floors.peak_gflops : 0.0;
  res.peak_rss_mb = peak_rss_mb();
  return res;
}

DecodeResult bench_decode(const Model& model, const ModelCost& cost, const MachineFloors& floors, int64_t context,
                          int64_t steps) {
  const std::vector<int32_t> ids = bench_tokens(context + steps, model.config().n_vocab);
  State st = model.new_state();
  for (int64_t i = 0; i < context; i += 4096)
    model.forward(ids.data() + i, SeqBatch::single(std::min<int64_t>(4096, context - i)), st, LogitsMode::none);
  std::vector<float> next_logits(static_cast<size_t>(model.config().n_vocab));
  std::vector<double> per_token;
  for (int64_t s = 0; s < steps; ++s) {
    auto t0 = Clock::now();
    Tensor logits = model.forward(ids.data() + context + s, SeqBatch::single(1), st, LogitsMode::last);
    model.backend().to_host(logits, next_logits.data());  // a sampler needs them on the host
    per_token.push_back(seconds_since(t0));
  }
  DecodeResult res;
  res.tokens = steps;
  res.context = context;
  res.ms_per_token = median(per_token) * 1e3;
  // Bytes per step: weights, WKV state in and out, and the keys/values the sparse blocks attend to.
  const int64_t t = context + steps / 2;
  const double kv = cost.n_sparse ? cost.attention_flops(t, t + 1) / 4.0 * 2.0 * 4.0 : 0.0;  // K and V rows, fp32
  const double bytes = cost.decode_weight_bytes + cost.state_bytes + kv;
  res.gbps = bytes / (res.ms_per_token * 1e-3) / 1e9;
  res.floor_ms = floors.mem_gbps > 0 ? bytes / (floors.mem_gbps * 1e9) * 1e3 : 0.0;
  res.ratio_to_floor = res.floor_ms > 0 ? res.ms_per_token / res.floor_ms : 0.0;
  return res;
}

}  // namespace rwkvx
