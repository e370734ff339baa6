// CUDA decode benchmark (scripts/bench_cuda.sh runs it): single-stream decode ms/token at given contexts
// through the whole-step decoder (CUDA graph) and op by op (each step's logits copied to the host, as a
// sampler needs; and the same steps back to back with one wait, the device's time per token), a ~1M-token
// context, and batched decode
// throughput at several batch sizes; device memory in use and each result's ratio to its memory-bandwidth
// floor, with the bandwidth measured in the same run (device-to-device copy, bytes read + written).
//
// rwkvx_cuda_decode_bench MODEL [--contexts 4096,131072] [--op-contexts 131072] [--long 1048000]
//                               [--batches 1,8,64,256] [--op-batches 64,256] [--batch-context 2000] [--steps 64]
//                               [--no-graph]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "bench_args.h"
#include "model/model.h"
#include "model/state_copy.h"
#include "runtime/benchmark.h"

using namespace rwkvx;
using rwkvx::bench::now_s;
using rwkvx::bench::parse_list;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

#define CK(x)                                                                   \
  do {                                                                          \
    cudaError_t e_ = (x);                                                       \
    if (e_ != cudaSuccess) {                                                    \
      std::fprintf(stderr, "CUDA error %s at %s\n", cudaGetErrorString(e_), #x); \
      std::exit(1);                                                             \
    }                                                                           \
  } while (0)

double hbm_gbps() {
  const size_t n = size_t(2) << 30;
  void *a = nullptr, *b = nullptr;
  CK(cudaMalloc(&a, n));
  CK(cudaMalloc(&b, n));
  CK(cudaMemset(a, 1, n));
  CK(cudaMemset(b, 2, n));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<double> t;
  for (int r = 0; r < 12; ++r) {
    CK(cudaEventRecord(e0));
    CK(cudaMemcpy(r % 2 ? a : b, r % 2 ? b : a, n, cudaMemcpyDeviceToDevice));
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= 2) t.push_back(ms * 1e-3);
  }
  cudaFree(a);
  cudaFree(b);
  return 2.0 * double(n) / median(t) / 1e9;
}

double used_gb() {
  size_t fr = 0, tot = 0;
  CK(cudaMemGetInfo(&fr, &tot));
  return double(tot - fr) / 1e9;
}

double peak_gb = 0;
void sample_mem() { peak_gb = std::max(peak_gb, used_gb()); }

std::vector<int32_t> tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& id : v) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    id = int32_t(x % uint64_t(vocab));
  }
  return v;
}

void prefill(const Model& m, State& st, const std::vector<int32_t>& ids, int64_t n, int slot) {
  for (int64_t i = 0; i < n; i += 4096) {
    const int64_t k = std::min<int64_t>(4096, n - i);
    m.forward(ids.data() + i, SeqBatch{{0, k}, {slot}}, st, LogitsMode::none);
    sample_mem();
  }
}

double kv_bytes_read(const ModelCost& c, int64_t t, double kv_elem) {
  return c.n_sparse ? c.attention_flops(t, t + 1) / 4.0 * 2.0 * kv_elem : 0.0;
}

size_t state_bytes(const State& s, int slot) { return state_slot_bytes(s, slot); }

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s MODEL [--contexts L] [--op-contexts L] [--long N] [--batches L] [--op-batches L] "
                         "[--batch-context N] [--steps N] [--no-graph]\n", argv[0]);
    return 2;
  }
  std::string model_path = argv[1];
  std::vector<int64_t> contexts{4096, 131072}, op_contexts{131072}, batches{1, 8, 64, 256}, op_batches{};
  int64_t long_ctx = 0, batch_ctx = 2000, steps = 64;
  bool graph = true;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() { return std::string(i + 1 < argc ? argv[++i] : ""); };
    if (a == "--contexts") contexts = parse_list(next());
    else if (a == "--op-contexts") op_contexts = parse_list(next());
    else if (a == "--long") long_ctx = std::stoll(next());
    else if (a == "--batches") batches = parse_list(next());
    else if (a == "--op-batches") op_batches = parse_list(next());
    else if (a == "--batch-context") batch_ctx = std::stoll(next());
    else if (a == "--steps") steps = std::stoll(next());
    else if (a == "--no-graph") graph = false;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  const double bw = hbm_gbps();
  std::printf("device: %s, %d SMs; measured HBM bandwidth (D2D copy, read+write): %.0f GB/s\n", prop.name,
              prop.multiProcessorCount, bw);
  CudaBackendOptions o;
  o.decode_graph = graph;
  auto be = make_cuda_backend(o);
  ModelOptions mo;
  auto model = Model::load(model_path, mo, *be);
  const ModelConfig& c = model->config();
  const ModelCost cost = count_model_cost(*model);
  const int64_t V = c.n_vocab;
  std::printf("model: %s; step decoder %s, graph %s; weights read per step %.1f MB, WKV state r+w %.1f MB\n",
              c.block_order_str().c_str(), model->step_decoder_active() ? "on" : "OFF", graph ? "on" : "off",
              cost.decode_weight_bytes / 1e6, cost.state_bytes / 1e6);
  std::vector<std::string> table;
  char line[512];

  // Single-stream decode at each context: fused step decoder, then op by op where asked.
  auto single = [&](int64_t ctx, bool fused, int64_t n_steps) {
    model->set_step_decoder(fused);
    const std::vector<int32_t> ids = tokens(ctx + 3 * n_steps + 4, V, uint64_t(ctx));
    State st = model->new_state();
    const double t0 = now_s();
    prefill(*model, st, ids, ctx, 0);
    std::vector<float> row(static_cast<size_t>(V));
    {  // warm-up step (graph capture)
      Tensor l = model->forward(ids.data() + ctx, SeqBatch::single(1), st, LogitsMode::last);
      be->to_host(l, row.data());
    }
    const double t_pre = now_s() - t0;
    std::vector<double> per;
    for (int64_t s = 0; s < n_steps; ++s) {
      const double a = now_s();
      Tensor l = model->forward(ids.data() + ctx + 1 + s, SeqBatch::single(1), st, LogitsMode::last);
      be->to_host(l, row.data());  // a sampler needs the logits on the host
      per.push_back(now_s() - a);
    }
    // The same number of steps back to back with one wait at the end: the device's time per token, with the
    // host's per-step work (and no logits copy to the host) overlapped.
    const double p0 = now_s();
    Tensor last;
    for (int64_t s = 0; s < n_steps; ++s)
      last = model->forward(ids.data() + ctx + 1 + n_steps + s, SeqBatch::single(1), st, LogitsMode::last);
    be->to_host(last, row.data());
    const double pipelined_ms = (now_s() - p0) / double(n_steps) * 1e3;
    // The waited step in two parts: the host's forward call (tables, launch) and the wait plus logits copy.
    std::vector<double> host_part, copy_part;
    for (int64_t s = 0; s < n_steps; ++s) {
      const double a = now_s();
      Tensor l = model->forward(ids.data() + ctx + 1 + 2 * n_steps + s, SeqBatch::single(1), st, LogitsMode::last);
      const double b = now_s();
      be->to_host(l, row.data());
      host_part.push_back(b - a), copy_part.push_back(now_s() - b);
    }
    sample_mem();
    const double ms = median(per) * 1e3;
    const int64_t t = ctx + 1 + n_steps / 2;
    const double kv_elem = c.kv_dtype == DType::bf16 ? 2.0 : 4.0;
    const double bytes = cost.decode_weight_bytes + cost.state_bytes + kv_bytes_read(cost, t, kv_elem);
    const double floor_ms = bytes / (bw * 1e9) * 1e3;
    std::snprintf(line, sizeof line,
                  "| decode @ %lld | %s | %.3f ms/token | %.0f tokens/s | floor %.3f ms (%.0f MB/step) | %.2fx | state %.2f GB, "
                  "device in use %.2f GB |",
                  (long long)ctx, fused ? (graph ? "fused+graph" : "fused, no graph") : "op by op", ms, 1e3 / ms, floor_ms,
                  bytes / 1e6, ms / floor_ms, double(state_bytes(st, 0)) / 1e9, used_gb());
    std::printf("%s  (prefill %.1f s, min %.3f ms, max %.3f ms; forward call %.3f ms + wait and copy %.3f ms)\n", line, t_pre,
                *std::min_element(per.begin(), per.end()) * 1e3, *std::max_element(per.begin(), per.end()) * 1e3,
                median(host_part) * 1e3, median(copy_part) * 1e3);
    table.push_back(line);
    std::snprintf(line, sizeof line, "| decode @ %lld | %s, steps back to back | %.3f ms/token | %.0f tokens/s | floor %.3f ms | %.2fx | |",
                  (long long)ctx, fused ? (graph ? "fused+graph" : "fused, no graph") : "op by op", pipelined_ms,
                  1e3 / pipelined_ms, floor_ms, pipelined_ms / floor_ms);
    std::printf("%s\n", line);
    std::fflush(stdout);
    table.push_back(line);
    model->set_step_decoder(true);
  };
  for (int64_t ctx : contexts) single(ctx, true, steps);
  for (int64_t ctx : op_contexts) single(ctx, false, std::min<int64_t>(steps, 16));
  if (long_ctx > 0) single(long_ctx, true, steps);

  // Batched decode: B streams at batch_ctx tokens each (one prefill copied to every slot), one step for all;
  // through the whole-step decoder, and for --op-batches op by op (GEMMs of B rows on the tensor cores).
  auto batched = [&](int64_t B, bool fused) {
    model->set_step_decoder(fused);
    const std::vector<int32_t> ids = tokens(batch_ctx + steps + 4, V, 99);
    State st = model->new_state(int(B));
    prefill(*model, st, ids, batch_ctx, 0);
    for (int s = 1; s < B; ++s) copy_state_slot(*be, st, 0, st, s);
    sample_mem();
    SeqBatch batch{{0}, {}};
    for (int s = 0; s < B; ++s) batch.row_start.push_back(s + 1), batch.slot.push_back(s);
    std::vector<int32_t> step_ids(static_cast<size_t>(B));
    std::vector<float> row(static_cast<size_t>(V));
    std::vector<double> per;
    for (int64_t t = 0; t < steps + 2; ++t) {
      for (int s = 0; s < B; ++s) step_ids[size_t(s)] = ids[size_t(batch_ctx + t)] ^ (s & 7);
      const double a = now_s();
      Tensor l = model->forward(step_ids.data(), batch, st, LogitsMode::last);
      be->to_host(l.rows_view(0, 1), row.data());  // waits for the step; logits stay on the device
      if (t >= 2) per.push_back(now_s() - a);
    }
    sample_mem();
    const double sec = median(per);
    const int64_t t = batch_ctx + 2 + steps / 2;
    const double kv_elem = c.kv_dtype == DType::bf16 ? 2.0 : 4.0;
    const double bytes = cost.decode_weight_bytes + double(B) * (cost.state_bytes + kv_bytes_read(cost, t, kv_elem));
    const double floor_s = bytes / (bw * 1e9);
    std::snprintf(line, sizeof line,
                  "| batch %lld @ %lld | %s | %.3f ms/step | %.0f tokens/s | floor %.3f ms (%.0f MB/step) | %.2fx | device in use %.2f GB |",
                  (long long)B, (long long)batch_ctx, fused ? (graph ? "fused+graph" : "fused, no graph") : "op by op", sec * 1e3, double(B) / sec, floor_s * 1e3, bytes / 1e6, sec / floor_s,
                  used_gb());
    std::printf("%s\n", line);
    std::fflush(stdout);
    table.push_back(line);
    model->set_step_decoder(true);
  };
  for (int64_t B : batches) batched(B, true);
  for (int64_t B : op_batches) batched(B, false);
  std::printf("\npeak device memory in use (cudaMemGetInfo samples, whole process): %.2f GB\n", peak_gb);
  std::printf("| run | path | time | throughput | floor (bytes / measured bandwidth) | ratio | memory |\n|---|---|---|---|---|---|---|\n");
  for (const std::string& s : table) std::printf("%s\n", s.c_str());
  return 0;
}
