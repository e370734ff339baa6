// Model benchmarks against this machine's floors (`rwkvx bench`): memory bandwidth and FMA peak are
// measured in the same run, FLOPs and bytes are counted from the model's shapes, and every result is
// reported as a ratio to its floor. Medians of repeated runs.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/model.h"

namespace rwkvx {

struct MachineFloors {
  double mem_gbps = 0;     // multi-threaded streaming read
  double peak_gflops = 0;  // fp32 FMA throughput of all threads (register-only loop)
  // AMX bf16 tile throughput of all threads (0 without AMX). The prefill GEMMs run three tile products
  // per fp32 term (exact products), so their exact-fp32 ceiling is a third of this.
  double tile_peak_gflops = 0;
  int threads = 1;
  std::string isa;
};

// Work per token counted from the model's shapes.
struct ModelCost {
  double matrix_flops_per_token = 0;  // 2 · (body matrix parameters): every Linear and low-rank product
  double wkv_flops_per_token = 0;     // the WKV-7 recurrence
  double decode_weight_bytes = 0;     // bytes of weights one decode step reads (body + head + one embedding row)
  double state_bytes = 0;             // WKV state read + written per decode step
  // Sparse-attention FLOPs for tokens [t0, t1) (4 · keys · C per sparse block; keys from §5 semantics).
  double attention_flops(int64_t t0, int64_t t1) const;
  int64_t n_sparse = 0, n_embd = 0, chunk = 0, top_k = 0;
};

struct PrefillResult {
  int64_t tokens = 0;
  double seconds = 0, tokens_per_s = 0, gflops = 0, ratio_to_peak = 0;
  int64_t peak_rss_mb = 0;
};

struct DecodeResult {
  int64_t tokens = 0, context = 0;
  double ms_per_token = 0, gbps = 0, floor_ms = 0, ratio_to_floor = 0;
};

// Measures the floors with `threads` workers on the CPU backend's kernels (the best ISA unless forced).
MachineFloors measure_machine_floors(int threads);
ModelCost count_model_cost(const Model& model);

using ProgressFn = std::function<void(int64_t done, int64_t total)>;
// Prefill of `tokens` pseudo-random ids from a fresh state in calls of `slice` tokens; median of `repeat`.
PrefillResult bench_prefill(const Model& model, const ModelCost& cost, const MachineFloors& floors, int64_t tokens,
                            int64_t slice, int repeat, const ProgressFn& progress);
// `steps` single-token decode steps after a prefill of `context` tokens; median per-token time.
DecodeResult bench_decode(const Model& model, const ModelCost& cost, const MachineFloors& floors, int64_t context,
                          int64_t steps);

int64_t peak_rss_mb();

}  // namespace rwkvx
