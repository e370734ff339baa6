// `rwkvx bench`: prefill tokens/s and decode ms/token, with the machine's memory bandwidth and matrix peak
// measured in the same run (the CPU's, or the GPU's with --device cuda) and every result given as a ratio
// to its floor.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_backend.h"
#include "commands.h"
#include "model_args.h"
#include "runtime/benchmark.h"
#include "runtime/engine.h"

namespace rwkvx {
namespace {

struct BenchArgs {
  ModelArgs model;
  std::string prefill = "512,4096";
  int64_t decode = 64, context = 0, slice = 0;
  int threads = 0, repeat = 3;
  bool json = false, int8 = false;
  std::string isa;
};

int64_t total_tenth(int64_t n) { return std::max<int64_t>(1, n / 10); }

void run_bench(const BenchArgs& a) {
  CpuBackendOptions o;
  o.n_threads = a.threads;
  o.quantize_int8 = a.int8;
  o.isa = a.isa;
  std::unique_ptr<Backend> be =
      a.model.device == "cpu" ? make_cpu_backend(o) : make_backend(a.model.device, a.int8);  // int8: CPU only
  // The CPU floors (memory bandwidth, FMA peak) describe the CPU backends; a GPU backend measures its own
  // (HBM bandwidth, tensor-core GEMM rate). The reference backend has none ('of floor' shows 0).
  const bool cpu_floors = be->name().rfind("cpu", 0) == 0;
  const bool tty = isatty(STDERR_FILENO);
  MachineFloors f;
  Backend::DeviceFloors dev;
  if (!a.json) std::fprintf(stderr, "measuring machine floors...\n");
  if (cpu_floors) {
    f = measure_machine_floors(a.threads);
  } else {
    dev = be->measure_floors();
    f.mem_gbps = dev.mem_gbps, f.peak_gflops = dev.matrix_gflops;
  }
  auto model = Model::load(a.model.path, a.model.options, *be);
  ModelCost cost = count_model_cost(*model);
  nlohmann::json out = {{"model", a.model.path},
                        {"backend", be->name()},
                        {"machine", {{"threads", f.threads}, {"isa", f.isa}, {"mem_gbps", f.mem_gbps},
                                     {"peak_gflops", f.peak_gflops}, {"tile_peak_gflops", f.tile_peak_gflops}}},
                        {"prefill", nlohmann::json::array()},
                        {"decode", nlohmann::json::array()}};
  if (!dev.how.empty()) out["machine"]["measured"] = dev.how;
  if (!a.json) {
    if (cpu_floors) {
      std::printf("backend %s | machine: %d threads, %s, memory %.1f GB/s, fp32 FMA peak %.1f GFLOP/s",
                  be->name().c_str(), f.threads, f.isa.c_str(), f.mem_gbps, f.peak_gflops);
      if (f.tile_peak_gflops > 0) std::printf(", AMX bf16 peak %.0f GFLOP/s", f.tile_peak_gflops);
      std::printf("\n");
    } else if (f.peak_gflops > 0) {
      std::printf("backend %s | device: memory %.0f GB/s, matrix peak %.1f TFLOP/s (%s)\n", be->name().c_str(),
                  f.mem_gbps, f.peak_gflops / 1e3, dev.how.c_str());
    } else {
      std::printf("backend %s (no floors measured: 'of floor' shows 0)\n", be->name().c_str());
    }
    std::printf("model: %s, %.1f M body params, decode reads %.1f MB/token\n\n", a.model.path.c_str(),
                cost.matrix_flops_per_token / 2e6, cost.decode_weight_bytes / 1e6);
    std::printf("%-22s %12s %12s %12s %10s %10s\n", "run", "tokens/s", "ms/token", "GFLOP/s|GB/s", "of floor", "RSS MB");
  }
  for (int64_t n : parse_token_counts("--prefill", a.prefill)) {
    // On a terminal one updating line; otherwise (logs) a line per tenth of a long run.
    int64_t next_log = total_tenth(n);
    auto progress = [&](int64_t done, int64_t total) {
      if (a.json) return;
      if (tty) {
        std::fprintf(stderr, "\rprefill %lld: %lld / %lld", (long long)n, (long long)done, (long long)total);
      } else if (n >= 32768 && done >= next_log) {
        std::fprintf(stderr, "prefill %lld: %lld / %lld tokens\n", (long long)n, (long long)done, (long long)total);
        next_log += total_tenth(n);
      }
    };
    // Default: calls of 4096 tokens, or of the model's window where it is larger (CUDA's 16384 rows), so a
    // long prefill is timed in the calls the backend runs best.
    const int64_t slice = a.slice > 0 ? a.slice : std::max<int64_t>(4096, model->config().max_rows_per_call);
    PrefillResult r = bench_prefill(*model, cost, f, n, slice, n >= 32768 ? 1 : a.repeat, progress);
    if (tty && !a.json) std::fprintf(stderr, "\r%60s\r", "");
    out["prefill"].push_back({{"tokens", n}, {"seconds", r.seconds}, {"tokens_per_s", r.tokens_per_s},
                              {"gflops", r.gflops}, {"ratio_to_peak", r.ratio_to_peak}, {"peak_rss_mb", r.peak_rss_mb}});
    if (!a.json)
      std::printf("%-22s %12.1f %12.3f %12.1f %9.0f%% %10lld\n", ("prefill " + std::to_string(n)).c_str(),
                  r.tokens_per_s, 1e3 / r.tokens_per_s, r.gflops, 100 * r.ratio_to_peak, (long long)r.peak_rss_mb);
    std::fflush(stdout);  // rows appear as they finish, also when stdout is a file
  }
  if (a.decode > 0) {
    DecodeResult d = bench_decode(*model, cost, f, a.context, a.decode);
    out["decode"].push_back({{"context", d.context}, {"steps", d.tokens}, {"ms_per_token", d.ms_per_token},
                             {"gbps", d.gbps}, {"floor_ms", d.floor_ms}, {"ratio_to_floor", d.ratio_to_floor}});
    if (!a.json)
      std::printf("%-22s %12.1f %12.3f %12.1f %9.2fx %10lld   (floor %.3f ms)\n",
                  ("decode @" + std::to_string(d.context)).c_str(), 1e3 / d.ms_per_token, d.ms_per_token, d.gbps,
                  d.ratio_to_floor, (long long)peak_rss_mb(), d.floor_ms);
  }
  if (a.json) std::printf("%s\n", out.dump(2).c_str());
}

}  // namespace
}  // namespace rwkvx

void register_bench_commands(CLI::App& app) {
  using namespace rwkvx;
  static BenchArgs a;
  CLI::App* cmd = app.add_subcommand(
      "bench", "time prefill and decode (fast CPU backend against this machine's measured floors, or --device cuda)");
  add_model_args(cmd, a.model);
  cmd->add_option("--device", a.model.device, "cpu (fast CPU backend), cuda (GPU) or reference")->default_val("cpu");
  cmd->add_option("--prefill", a.prefill, "comma-separated prefill lengths (K/M suffixes allowed)")->default_val("512,4096");
  cmd->add_option("--decode", a.decode, "decode steps to time (0: none)")->default_val(64);
  cmd->add_option("--context", a.context, "tokens prefilled before the timed decode steps")->default_val(0);
  cmd->add_option("--threads", a.threads, "worker threads (0: all hardware threads)")->default_val(0);
  cmd->add_option("--repeat", a.repeat, "prefill repetitions (median reported; runs >= 32K tokens once)")->default_val(3);
  cmd->add_option("--slice", a.slice,
                  "prefill tokens per call (0: 4096, or the model's window if larger: 8192 rows on the fast CPU backend, 16384 with CUDA)")
      ->check(CLI::Range(int64_t(0), int64_t(1) << 30))
      ->default_val(0);
  cmd->add_flag("--int8", a.int8, "quantize Linear weights to int8 (one scale per output channel)");
  cmd->add_option("--isa", a.isa, "force an instruction set: scalar, avx2, avx512, amx");
  cmd->add_flag("--json", a.json, "print one JSON object instead of the table");
  cmd->callback([] { run_bench(a); });
}
