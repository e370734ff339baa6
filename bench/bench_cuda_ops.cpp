// CUDA op timings at the RWKV-X 0.2B shapes (C = 768, 12 heads of 64), for the side-by-side table with
// fla's chunk_rwkv7 and PyTorch SDPA (scripts/peers/gpu_peers.py); scripts/bench_cuda.sh runs both
// with RWKVX_BENCH_PEERS=1:
//   wkv7 over T tokens from a zero state (the prefill recurrence of one layer);
//   one sparse-attention layer's prefill: kv_append of T keys/values, then T causal queries
//   (chunk 2048, top-k 3), with an fp32 and a bf16 KV cache, in the default (bf16 hi + lo split) tile
//   precision and, as "…_single_bf16", with single_bf16_attention (one bf16 rounding per operand, as SDPA).
// Prints one JSON object per line: {"op", "T", "ms" (median of --repeat), "tokens_per_s", "tflops"}.
// FLOPs count multiply-adds as 2: wkv7 ≈ 8 per state element (N·C of them) per token (decay, α-read,
// β and v·k updates, r-read); sparse attention 4·D per (query, attended key) per head, with the attended keys of
// query t = its own-chunk prefix plus min(k−1, ⌊t/c⌋) full past chunks.
//   build-cuda/bench/bench_cuda_ops [--tokens 4096,16384,65536,131072] [--repeat 5] [--only wkv7|attention]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/ops.h"

namespace rwkvx {
namespace {

constexpr int64_t kC = 768, kN = 64;

Tensor random_tensor(Backend& be, int64_t rows, int64_t cols, float lo, float hi, uint32_t seed) {
  Tensor t = be.alloc(DType::f32, {rows, cols});
  std::vector<float> v(static_cast<size_t>(rows * cols));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  for (float& x : v) x = u(rng);
  be.from_host(v.data(), t);
  return t;
}

// Waits for the backend's stream: to_host synchronises, and a 1-element copy costs nothing.
void sync(Backend& be, const Tensor& probe) {
  float x;
  be.to_host(probe, &x);
}

template <class F>
double median_ms(Backend& be, const Tensor& probe, int repeat, F&& run) {
  run();  // warm-up: allocator caches, cuBLASLt plans
  sync(be, probe);
  std::vector<double> ms;
  for (int i = 0; i < repeat; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    run();
    sync(be, probe);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

double sparse_attention_flops(int64_t T, int64_t c, int64_t top_k) {
  double keys = 0;
  for (int64_t t = 0; t < T; ++t) keys += double(t % c + 1) + double(std::min(top_k - 1, t / c) * c);
  return 4.0 * double(kN) * keys * double(kC / kN);
}

void print(const char* op, int64_t T, double ms, double flops) {
  std::printf("{\"op\": \"%s\", \"T\": %lld, \"ms\": %.4f, \"tokens_per_s\": %.0f, \"tflops\": %.2f}\n", op,
              static_cast<long long>(T), ms, double(T) / ms * 1e3, flops / ms * 1e-9);
  std::fflush(stdout);
}

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(std::stoll(item));
  return out;
}

int run(int argc, char** argv) {
  std::vector<int64_t> lengths = {4096, 16384, 65536, 131072};
  int repeat = 5;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tokens" && i + 1 < argc) {
      lengths = parse_list(argv[++i]);
    } else if (a == "--repeat" && i + 1 < argc) {
      repeat = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--only" && i + 1 < argc && (std::string(argv[i + 1]) == "wkv7" || std::string(argv[i + 1]) == "attention")) {
      only = argv[++i];
    } else {
      std::fprintf(stderr, "usage: bench_cuda_ops [--tokens 4096,16384,...] [--repeat N] [--only wkv7|attention]\n");
      return 2;
    }
  }
  std::string why;
  if (!cuda_device_available(&why)) {
    std::fprintf(stderr, "bench_cuda_ops: no CUDA device (%s)\n", why.c_str());
    return 1;
  }
  auto be = make_cuda_backend();
  Tensor probe = be->alloc(DType::f32, {1, 1});
  CudaBackendOptions single_opt;  // inputs come from `be`, whose work is finished before each timing
  single_opt.single_bf16_attention = true;
  auto single = make_cuda_backend(single_opt);
  Tensor single_probe = single->alloc(DType::f32, {1, 1});
  for (const int64_t T : lengths) {
    // WKV-7 inputs in the ranges the model produces: decay w ∈ (0.5, 1), small α/β, unit-scale r/k/v.
    Tensor r = random_tensor(*be, T, kC, -1, 1, 1), w = random_tensor(*be, T, kC, 0.5f, 0.999f, 2);
    Tensor k = random_tensor(*be, T, kC, -0.2f, 0.2f, 3), v = random_tensor(*be, T, kC, -1, 1, 4);
    Tensor alpha = random_tensor(*be, T, kC, -0.05f, 0.05f, 5), beta = random_tensor(*be, T, kC, -0.05f, 0.05f, 6);
    Tensor state = be->alloc(DType::f32, {1, kC / kN, kN, kN}), y = be->alloc(DType::f32, {T, kC});
    const SeqBatch batch = SeqBatch::single(T);
    if (only != "attention") {
      const double wkv_ms = median_ms(*be, probe, repeat, [&] {
        be->fill_zero(state);
        be->wkv7(r, w, k, v, alpha, beta, state, batch, y, int(kN));
      });
      print("wkv7", T, wkv_ms, 8.0 * double(kN) * double(kC) * double(T));
    }
    if (only == "wkv7") continue;

    const SparseAttnParams p;  // chunk 2048, top-k 3, head 64
    const double flops = sparse_attention_flops(T, p.chunk, p.top_k);
    for (Backend* b : {be.get(), single.get()}) {
      for (const DType kv : {DType::f32, DType::bf16}) {
        const double ms = median_ms(*b, b == be.get() ? probe : single_probe, repeat, [&] {
          KvCache cache;
          cache.dtype = kv;
          b->kv_append(cache, k, v, p.chunk);
          b->sparse_attention(r, cache, p, y);
        });
        const std::string op = std::string("sparse_attention_prefill_") + (kv == DType::f32 ? "f32kv" : "bf16kv") +
                               (b == single.get() ? "_single_bf16" : "");
        print(op.c_str(), T, ms, flops);
      }
    }
  }
  return 0;
}

}  // namespace
}  // namespace rwkvx

int main(int argc, char** argv) {
  try {
    return rwkvx::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_ops: %s\n", e.what());
    return 1;
  }
}
