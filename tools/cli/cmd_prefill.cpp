// `rwkvx prefill`: one long prefill (pseudo-random token ids), timed, on one GPU or context-parallel over
// several (README "Context-parallel prefill"; runtime/context_parallel.h):
//   rwkvx prefill --device cuda -m M --tokens 1M                          (Model::forward, one GPU)
//   scripts/launch_dp.sh 2 rwkvx prefill --device cuda -m M --tokens 1M --context-parallel
// Prints the time, tokens/s, each rank's time and fingerprints of the last token's logits and of the final
// state (on the last rank), so runs on different numbers of GPUs can be compared for equality.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "commands.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "model/model.h"
#include "model_args.h"
#include "runtime/context_parallel.h"
#include "runtime/engine.h"
#include "runtime/hash64.h"
#include "train/dist/dist.h"
#ifdef RWKVX_HAVE_CUDA
#include "runtime/cuda/cp_nccl.h"
#include "train/dist/cuda/nccl_comm.h"
#endif

namespace rwkvx {
namespace {

struct PrefillArgs {
  ModelArgs model;
  std::string tokens = "65536";
  uint64_t seed = 1;
  bool context_parallel = false;
  std::string out_logits;
  double cost_slope = -1;  // -1: cp_default_cost_slope
};

std::vector<int32_t> random_ids(int64_t n, int64_t vocab, uint64_t seed) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  uint64_t z = seed * 0x9e3779b97f4a7c15ULL + 1;
  for (int64_t i = 0; i < n; ++i) {
    z += 0x9e3779b97f4a7c15ULL;
    uint64_t x = z;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    ids[size_t(i)] = int32_t((x ^ (x >> 31)) % uint64_t(vocab));
  }
  return ids;
}

std::vector<float> host(Backend& be, const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  be.to_host(t, v.data());
  return v;
}

// The recurrent states, every chunk mean and the last (up to) 4096 K/V rows of each sparse block.
std::string state_fingerprint(const Model& m, const State& s) {
  Backend& be = m.backend();
  Hash64 h;
  auto add = [&](const Tensor& t) {
    if (t.dtype != DType::f32) return;  // bf16 KV rows: covered by the fp32 chunk means
    const std::vector<float> v = host(be, t);
    h.update(v.data(), v.size() * sizeof(float));
  };
  for (const Tensor& t : s.att_shift) add(t);
  for (const Tensor& t : s.wkv) add(t);
  for (const Tensor& t : s.ffn_shift) add(t);
  for (const auto& caches : s.kv) {
    const KvCache& kv = caches[0];
    h.update_u64(uint64_t(kv.len));
    h.update_u64(uint64_t(kv.n_chunks));
    if (kv.n_chunks > 0) add(kv.chunk_mean.rows_view(0, kv.n_chunks));
    const int64_t tail = std::min<int64_t>(kv.len, 4096);
    if (tail > 0) add(kv.k.rows_view(kv.len - tail, tail)), add(kv.v.rows_view(kv.len - tail, tail));
  }
  return h.hex();
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void run_prefill(const PrefillArgs& a) {
  const train::dist::DistEnv env = train::dist::dist_env();
  if (env.distributed() && !a.context_parallel)
    throw Error("prefill: WORLD_SIZE=" + std::to_string(env.world) + " needs --context-parallel");
#ifdef RWKVX_HAVE_CUDA
  std::unique_ptr<train::dist::Communicator> comm;
  if (env.distributed()) {
    if (a.model.device != "cuda") throw Error("prefill: context parallel over several processes needs --device cuda");
    comm = std::make_unique<train::dist::Communicator>(env);  // cudaSetDevice(LOCAL_RANK)
  }
#else
  if (env.distributed())
    throw Error("prefill: context parallel over several processes needs a CUDA build (-DRWKVX_CUDA=ON)");
#endif
  std::unique_ptr<Backend> be = make_backend(a.model.device, a.model.int8, env.local_rank);
  auto model = Model::load(a.model.path, a.model.options, *be);
  const ModelConfig& c = model->config();
  const std::vector<int64_t> counts = parse_token_counts("--tokens", a.tokens);
  if (counts.size() != 1) throw Error("--tokens: '" + a.tokens + "': give one length (e.g. 65536, 64K, 1M)");
  const int64_t T = counts[0];
  const std::vector<int32_t> ids = random_ids(T, c.n_vocab, a.seed);
  const bool last = env.rank == env.world - 1;
  std::unique_ptr<CpLink> link;
#ifdef RWKVX_HAVE_CUDA
  NcclCpLink* nlink = nullptr;
  if (comm) link.reset(nlink = new NcclCpLink(*comm, *be));
#endif
  auto barrier = [&] {
#ifdef RWKVX_HAVE_CUDA
    if (comm) comm->barrier();
#endif
  };
  const double slope = a.cost_slope >= 0 ? a.cost_slope : cp_default_cost_slope(c, be->name().find("cuda") != std::string::npos);
  if (a.context_parallel) {  // fails early (and the same on every rank) for a bad size
    const auto plan = plan_segments(T, env.world, cp_alignment(c), slope);
    if (env.rank == 0)
      for (size_t r = 0; r < plan.size(); ++r)
        std::fprintf(stderr, "prefill: rank %zu tokens [%lld, %lld)\n", r, (long long)plan[r].begin, (long long)plan[r].end);
  }
  {  // warm-up (kernel loading, GEMM plans): one window, not timed
    State w = model->new_state(1);
    const int64_t n = std::min<int64_t>(T, std::max<int64_t>(1, c.max_rows_per_call));
    Tensor l = model->forward(ids.data(), SeqBatch::single(n), w, LogitsMode::last);
    host(*be, l);
  }
  barrier();
  State state = model->new_state(1);
  const double t0 = now_s();
  Tensor logits = a.context_parallel
                      ? context_parallel_prefill(*model, ids.data(), T, env.rank, env.world, link.get(), state, nullptr, slope)
                      : model->forward(ids.data(), SeqBatch::single(T), state, LogitsMode::last);
  const std::vector<float> lh = host(*be, logits);  // waits for the GPU
#ifdef RWKVX_HAVE_CUDA
  if (nlink) nlink->synchronize();
#endif
  const double mine = now_s() - t0;
  std::vector<double> times(static_cast<size_t>(env.world), 0.0);
  times[size_t(env.rank)] = mine;
#ifdef RWKVX_HAVE_CUDA
  if (comm)
    for (int r = 0; r < env.world; ++r) times[size_t(r)] = comm->all_reduce_sum_host(r == env.rank ? mine : 0.0);
#endif
  if (!last) return;
  const double wall = *std::max_element(times.begin(), times.end());
  Hash64 lhash;
  lhash.update(lh.data(), lh.size() * sizeof(float));
  double sum = 0;
  size_t arg = 0;
  for (size_t i = 0; i < lh.size(); ++i) {
    sum += lh[i];
    if (lh[i] > lh[arg]) arg = i;
  }
  std::string per_rank;
  for (double t : times) per_rank += (per_rank.empty() ? "" : " ") + std::to_string(t).substr(0, 6);
  std::printf("prefill %lld tokens on %d %s (%s): %.3f s, %.0f tokens/s | rank times s: %s\n", (long long)T, env.world,
              env.world == 1 ? "process" : "processes", a.context_parallel ? "context parallel" : "Model::forward",
              wall, double(T) / wall, per_rank.c_str());
  std::printf("last logits: hash %s sum %.9g argmax %zu logit %.9g | state hash %s\n", lhash.hex().c_str(), sum, arg,
              lh[arg], state_fingerprint(*model, state).c_str());
  if (!a.out_logits.empty()) {
    AtomicFile f(a.out_logits);
    f.write(lh.data(), lh.size() * sizeof(float));
    f.commit();
  }
}

}  // namespace
}  // namespace rwkvx

void register_prefill_commands(CLI::App& app) {
  using namespace rwkvx;
  static PrefillArgs a;
  CLI::App* cmd = app.add_subcommand(
      "prefill", "time one long prefill; --context-parallel splits it over the GPUs of scripts/launch_dp.sh");
  add_model_args(cmd, a.model);
  add_device_arg(cmd, a.model);
  cmd->add_option("--tokens", a.tokens, "prefill length (K/M suffixes: 1M = 1048576)")->default_val("65536");
  cmd->add_option("--seed", a.seed, "seed of the pseudo-random token ids")->default_val(1);
  cmd->add_flag("--context-parallel", a.context_parallel,
                "block-by-block wavefront over the ranks of WORLD_SIZE (1: the same schedule on one device)");
  cmd->add_option("--cp-cost-slope", a.cost_slope,
                  "segment plan: a token at position t costs 1 + S*t/T (default: 1.2 on CUDA with an fp32 KV cache, "
                  "else 0 = equal segments)");
  cmd->add_option("--out-logits", a.out_logits, "write the last token's logits (raw fp32) here (last rank)");
  cmd->callback([] { run_prefill(a); });
}
