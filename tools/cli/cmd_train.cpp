// `rwkvx train CONFIG [--resume DIR]`: the trainer (src/train/trainer.h) with terminal progress. The config
// format is documented in docs/training.md. Ctrl-C ends the current step, saves a checkpoint and a
// training state, and exits with status 130; `--resume OUT_DIR` continues exactly.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>

#include "commands.h"
#include "core/error.h"
#include "train/train_config.h"
#include "train/trainer.h"

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
  std::printf("trained %lld steps; checkpoints, %s, loss.csv and loss.png in %s\n", static_cast<long long>(r.steps),
              r.last_state.c_str(), cfg.out_dir.c_str());
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
}
