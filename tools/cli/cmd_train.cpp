// `rwkvx train CONFIG [--resume DIR]`: the trainer (src/train/trainer.h) with terminal progress. The config
// format is documented in docs/training.md. Ctrl-C ends the current step, saves a checkpoint and a
// training state, and exits with status 130; `--resume OUT_DIR` continues exactly.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>

#include <fstream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "core/error.h"
#include "model/formats/safetensors_writer.h"
#include "train/train_config.h"
#include "train/train_model.h"
#include "train/trainer.h"
#ifdef RWKVX_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#include "train/cuda/cuda_train_model.h"
#endif

namespace rwkvx {
namespace {

struct TrainArgs {
  std::string config, resume, device;
};

std::atomic<bool> g_stop{false};

void on_sigint(int) {
  g_stop.store(true);
  // A second Ctrl-C kills the process the usual way.
  std::signal(SIGINT, SIG_DFL);
}

std::string duration(double s) {
  if (!(s >= 0) || s > 1e9) return "?";
  const long long t = static_cast<long long>(s + 0.5);
  char b[48];
  if (t >= 3600)
    std::snprintf(b, sizeof b, "%lldh%02lldm", t / 3600, (t / 60) % 60);
  else if (t >= 60)
    std::snprintf(b, sizeof b, "%lldm%02llds", t / 60, t % 60);
  else
    std::snprintf(b, sizeof b, "%llds", t);
  return b;
}

void run_train(const TrainArgs& a) {
  train::TrainConfig cfg = train::load_train_config(a.config);
  if (!a.device.empty()) cfg.device = a.device;
  const bool tty = isatty(STDERR_FILENO);
  bool line_open = false;
  auto end_line = [&] {
    if (line_open) std::fputc('\n', stderr);
    line_open = false;
  };
  train::TrainRunOptions opt;
  opt.resume = a.resume;
  opt.stop = &g_stop;
  opt.log = [&](const std::string& s) {
    end_line();
    std::fprintf(stderr, "%s\n", s.c_str());
  };
  opt.progress = [&](const train::TrainProgress& p) {
    const bool last = p.step == p.total_steps;
    if (!tty && !(p.step % cfg.log_every == 0 || last || p.run_steps == 1)) return;
    std::fprintf(stderr, "%sstep %lld/%lld  loss %.4f  lr %.3g  |g| %.3g  %.0f tokens/s  ETA %s%s", tty ? "\r" : "",
                 static_cast<long long>(p.step), static_cast<long long>(p.total_steps), p.loss, p.lr, p.grad_norm,
                 p.tokens_per_s, duration(p.eta_s).c_str(), tty ? "   " : "\n");
    line_open = tty;
    if (tty) std::fflush(stderr);
  };
  std::signal(SIGINT, on_sigint);
  const train::TrainResult r = train::run_training(cfg, opt);
  std::signal(SIGINT, SIG_DFL);
  end_line();
  if (r.stopped) {
    std::fprintf(stderr, "interrupted after step %lld; continue with: rwkvx train %s --resume %s\n",
                 static_cast<long long>(r.steps), a.config.c_str(), cfg.out_dir.c_str());
    std::fflush(stderr);
    std::exit(130);
  }
  // Data parallel: only rank 0 (the one that wrote the files) says so.
  const char* rank = std::getenv("RANK");
  if (rank && std::getenv("WORLD_SIZE") && std::atoi(std::getenv("WORLD_SIZE")) > 1 && std::atoi(rank) != 0) return;
  std::printf("trained %lld steps; checkpoints, %s, loss.csv and loss.png in %s\n", static_cast<long long>(r.steps),
              r.last_state.c_str(), cfg.out_dir.c_str());
}

struct GradArgs {
  std::string model, tokens_json, out, device = "cpu";
  bool fp32 = false, no_l2wrap = false;
  int chunk = 0, top_k = 0;
};

// `rwkvx grad`: the gradient of one sequence's training loss (plain CE, L2Wrap unless turned off, no
// padding, batch 1) for every parameter, written as f32 safetensors under the checkpoint names: for
// comparing with another trainer (scripts/peers/official_grads.py) or inspecting a model.
void run_grad(const GradArgs& a) {
  std::ifstream f(a.tokens_json);
  if (!f) throw Error(a.tokens_json + ": cannot open");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    throw Error(a.tokens_json + ": not valid JSON: " + e.what());
  }
  if (!j.is_object() || !j.contains("tokens") || !j["tokens"].is_array())
    throw Error(a.tokens_json + ": expected an object with a \"tokens\" array of token ids");
  std::vector<int32_t> tok;
  for (const auto& t : j["tokens"]) {
    if (!t.is_number_integer()) throw Error(a.tokens_json + ": \"tokens\" holds a non-integer: " + t.dump());
    tok.push_back(t.get<int32_t>());
  }
  if (tok.size() < 2) throw Error(a.tokens_json + ": needs at least 2 tokens (inputs and their next tokens)");
  ModelOptions mo;
  mo.chunk = a.chunk, mo.top_k = a.top_k;
  if (j.contains("config") && j["config"].is_object()) {  // a golden case.json names its sparse settings
    if (mo.chunk == 0) mo.chunk = j["config"].value("chunk", 0);
    if (mo.top_k == 0) mo.top_k = j["config"].value("topk", 0);
  }
  train::TrainModel m = train::TrainModel::load(a.model, mo);
  train::LossOptions lo;
  lo.pad_multiple = 0;
  lo.l2wrap = !a.no_l2wrap;
  const int64_t T = int64_t(tok.size()) - 1;
  train::LossReport r;
  std::string where = "cpu (fp32)";
  if (a.device == "cuda") {
#ifdef RWKVX_HAVE_CUDA
    std::string why;
    if (!cuda_device_available(&why)) throw Error("--device cuda: no usable GPU (" + why + ")");
    train::CudaTrainOptions o;
    o.bf16_gemm = !a.fp32;
    train::CudaTrainModel g(m, o);
    r = g.forward_backward(tok.data(), tok.data() + 1, T, lo);
    g.download_grads(m);
    where = std::string("cuda (") + (a.fp32 ? "fp32" : "bf16") + " products)";
#else
    throw Error("--device cuda: this build has no CUDA backend (configure with -DRWKVX_CUDA=ON)");
#endif
  } else {
    m.zero_grad();
    r = m.forward_backward(tok.data(), tok.data() + 1, T, lo);
  }
  std::vector<TensorData> grads;
  for (size_t i = 0; i < m.n_params(); ++i)
    grads.push_back(make_tensor_data(m.param(i).name, DType::f32, m.param(i).shape, m.grad(i)));
  save_safetensors(a.out, grads);
  std::printf("loss %.9g (mean CE %.9g) over %lld positions on %s; %zu gradients written to %s\n", r.loss, r.mean_ce,
              static_cast<long long>(T), where.c_str(), grads.size(), a.out.c_str());
}

}  // namespace
}  // namespace rwkvx

void register_train_commands(CLI::App& app) {
  using namespace rwkvx;
  static TrainArgs ta;
  CLI::App* t = app.add_subcommand(
      "train",
      "train an RWKV-7 / RWKV-X model on the CPU or a GPU as a JSON config describes (stage1: only the sparse blocks; "
      "stage2: all weights with LongCE; sft: responses only); see docs/training.md for the keys");
  t->add_option("config", ta.config, "the JSON config file")->required()->check(CLI::ExistingFile);
  t->add_option("--resume", ta.resume,
                "continue exactly from a saved training state: the out_dir (its newest state-N/), a state-N "
                "directory, or its state.json");
  t->add_option("--device", ta.device, "cpu | cuda: where the steps run (overrides the config's 'device')")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  t->callback([] { run_train(ta); });

  static GradArgs ga;
  CLI::App* g = app.add_subcommand(
      "grad", "the gradient of one sequence's training loss (CE + L2Wrap) for every parameter, as f32 safetensors");
  g->add_option("--model", ga.model, "checkpoint (.pth / .safetensors)")->required()->check(CLI::ExistingFile);
  g->add_option("--tokens-json", ga.tokens_json,
                "JSON object with a \"tokens\" array (a golden case.json works; its config.chunk/topk are used)")
      ->required()
      ->check(CLI::ExistingFile);
  g->add_option("--out", ga.out, "output .safetensors")->required();
  g->add_option("--device", ga.device, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  g->add_flag("--fp32", ga.fp32, "cuda: fp32 products instead of bf16");
  g->add_flag("--no-l2wrap", ga.no_l2wrap, "plain CE without the L2Wrap gradient");
  g->add_option("--chunk", ga.chunk, "sparse-attention chunk size (0: the case's or the model's)");
  g->add_option("--top-k", ga.top_k, "sparse-attention chunks per query (0: the case's or the model's)");
  g->callback([] { run_grad(ga); });
}
