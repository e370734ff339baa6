// CUDA training benchmark: tokens/s of whole training steps (forward, loss, backward, AdamW) of a model
// with real shapes and random weights on random tokens, and the device memory the step holds at its peak,
// at several context lengths (scripts/bench_cuda.sh runs it; BENCHMARKS.md records it).
//
// rwkvx_cuda_train_bench [--preset rwkvx-0.2b | --model FILE] [--contexts 4096,65536] [--steps 3]
//                        [--batch 1] [--fp32] [--recompute on|off|auto] [--loss ce|longce] [--stage1]
// Each context: one warm-up step, then --steps timed steps; the median is reported. Recompute is on by
// default, as the official trainer runs (--grad_cp 1); "auto" keeps activations up to 8K tokens.
// Data parallel (WORLD_SIZE > 1, started by scripts/launch_dp.sh N rwkvx_cuda_train_bench ...): --batch is
// the global batch; rank r runs the sequences b ≡ r (mod world) of each step, the gradients are summed
// into their ZeRO-1 owners and the step is DistAdamW's (as `rwkvx train`, the reduction overlapped with
// the last sequence's backward unless RWKVX_DIST_OVERLAP=0); rank 0 prints the tokens/s of the whole job
// and per GPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_args.h"
#include "core/error.h"
#include "model/random_init.h"
#include "train/cuda/cuda_train_model.h"
#include "train/dist/cuda/dist_adamw.h"
#include "train/dist/cuda/nccl_comm.h"
#include "train/train_model.h"

using namespace rwkvx;
using rwkvx::bench::now_s;
using rwkvx::bench::parse_list;
using namespace rwkvx::train;


int main(int argc, char** argv) try {
  std::string preset = "rwkvx-0.2b", model_path, recompute = "on", loss = "ce";
  std::vector<int64_t> contexts = {4096, 65536};
  int steps = 3;
  int64_t batch = 1;
  bool fp32 = false, stage1 = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw Error(a + ": missing value");
      return argv[++i];
    };
    if (a == "--preset") preset = next();
    else if (a == "--model") model_path = next();
    else if (a == "--contexts") contexts = parse_list(next());
    else if (a == "--steps") steps = std::max(1, std::atoi(next().c_str()));
    else if (a == "--batch") batch = std::max<int64_t>(1, std::atoll(next().c_str()));
    else if (a == "--fp32") fp32 = true;
    else if (a == "--recompute") recompute = next();
    else if (a == "--loss") loss = next();
    else if (a == "--stage1") stage1 = true;
    else throw Error("unknown argument " + a);
  }
  const dist::DistEnv env = dist::dist_env();
  std::unique_ptr<dist::Communicator> comm;
  if (env.distributed()) comm = std::make_unique<dist::Communicator>(env);  // cudaSetDevice(LOCAL_RANK)
  const bool lead = env.rank == 0;
  const int64_t local_batch = int64_t(dist::local_samples(batch, env.rank, env.world).size());
  ModelOptions mo;
  mo.chunk = 2048;
  mo.top_k = 3;
  TrainModel host = [&] {
    if (!model_path.empty()) return TrainModel::load(model_path, mo);
    for (const ModelPreset& p : model_presets())
      if (p.name == preset) return TrainModel::random(p.spec, mo);
    throw Error("unknown preset " + preset);
  }();
  if (stage1) host.freeze_all_but_sparse();
  int64_t n_params = 0, n_trainable = 0;
  for (size_t i = 0; i < host.n_params(); ++i) {
    n_params += host.param(i).numel;
    if (host.param(i).trainable) n_trainable += host.param(i).numel;
  }
  cudaDeviceProp prop{};
  int dev = 0;
  cudaGetDevice(&dev);
  cudaGetDeviceProperties(&prop, dev);
  if (lead) {
    std::printf("device %s x %d | model %s: %.1fM parameters (%.1fM trainable), %s products, loss %s, batch %lld\n",
                prop.name, env.world, model_path.empty() ? preset.c_str() : model_path.c_str(), n_params / 1e6,
                n_trainable / 1e6, fp32 ? "fp32" : "bf16", loss.c_str(), static_cast<long long>(batch));
    if (comm) {
      const dist::OverlapOptions ov = dist::overlap_options();
      const std::string how = ov.on ? "overlapped with the backward, buckets of " +
                                          std::to_string(ov.bucket_bytes >> 20) + " MiB"
                                    : std::string("after the backward (RWKVX_DIST_OVERLAP=0)");
      std::printf("data parallel: gradient reduction %s\n", how.c_str());
    }
    std::printf("%8s %10s %12s %12s %12s %12s %10s\n", "context", "recompute", "step ms", "tokens/s", "tok/s/GPU",
                "peak GB", "loss");
  }
  const int64_t V = host.config().n_vocab;
  for (int64_t T : contexts) {
    CudaTrainOptions o;
    o.bf16_gemm = !fp32;
    const bool rc = recompute == "on" || (recompute == "auto" && T > 8192);
    host.recompute = rc;
    CudaTrainModel gpu(host, o);
    std::unique_ptr<CudaAdamW> opt;
    std::unique_ptr<dist::DistAdamW> dopt;
    if (comm) dopt = std::make_unique<dist::DistAdamW>(gpu, AdamWOptions{}, *comm);
    else opt = std::make_unique<CudaAdamW>(gpu, AdamWOptions{});
    LossOptions lo;
    lo.kind = loss == "longce" ? LossKind::longce : LossKind::ce;
    lo.batch_size = batch;
    lo.pad_multiple = 16;
    std::mt19937_64 rng{uint64_t(T) + 7919u * uint64_t(env.rank)};
    std::vector<int32_t> ids(size_t(T + 1));
    std::vector<double> times;
    double last_loss = 0;
    gpu.reset_peak_device_bytes();
    for (int s = 0; s <= steps; ++s) {
      const double t0 = now_s();
      gpu.zero_grad();
      last_loss = 0;
      if (comm) comm->barrier();  // every rank starts the step together
      for (int64_t b = 0; b < local_batch; ++b) {
        for (int32_t& x : ids) x = int32_t(rng() % uint64_t(V));
        if (dopt && b + 1 == local_batch && batch >= env.world) dopt->overlap_next_backward();
        last_loss += gpu.forward_backward(ids.data(), ids.data() + 1, T, lo).loss;
      }
      if (dopt) {
        dopt->step(1e-5, 1e-3);
        last_loss = comm->all_reduce_sum_host(last_loss);
      } else {
        opt->step(1e-5, 1e-3);
      }
      if (s > 0) times.push_back(now_s() - t0);  // step 0 warms up (allocations, cuBLAS heuristics)
    }
    std::sort(times.begin(), times.end());
    double med = times[times.size() / 2];
    const double peak_gb = double(gpu.peak_device_bytes()) / 1e9;
    if (comm) med = comm->all_reduce_sum_host(med) / env.world;  // (the ranks' medians agree closely)
    if (!lead) continue;
    std::printf("%8lld %10s %12.1f %12.0f %12.0f %12.2f %10.4f\n", static_cast<long long>(T), rc ? "on" : "off",
                med * 1e3, double(T * batch) / med, double(T * batch) / med / env.world, peak_gb, last_loss);
    std::printf("JSON {\"bench\": \"cuda_train\", \"ctx\": %lld, \"batch\": %lld, \"world\": %d, \"recompute\": %s, "
                "\"precision\": \"%s\", \"step_ms\": %.3f, \"tokens_per_s\": %.1f, \"tokens_per_s_per_gpu\": %.1f, "
                "\"peak_gb\": %.3f}\n",
                static_cast<long long>(T), static_cast<long long>(batch), env.world, rc ? "true" : "false",
                fp32 ? "fp32" : "bf16", med * 1e3, double(T * batch) / med, double(T * batch) / med / env.world, peak_gb);
    std::fflush(stdout);
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "rwkvx_cuda_train_bench: %s\n", e.what());
  return 1;
}
