// The training loop behind `rwkvx train CONFIG` (spec system.md §4.2–§4.8): loads the model (or a saved
// training state), applies the stage (stage 1 freezes everything but the sparse blocks), draws batches
// (pretraining: the magic-prime windows of a binidx dataset; SFT: jsonl conversations), runs AdamW under
// the official schedule, and writes into out_dir:
//   rwkv-<step>.pth / .safetensors, rwkv-final.*   model checkpoints in the official key layout (§3.1)
//   state-<step>/                                  exact-resume state: weights.safetensors (fp32 master
//                                                  weights), optimizer.safetensors (AdamW moments),
//                                                  state.json (step, data position, trajectory settings)
//   loss.csv, loss.png                             one row per step, and the curve
// Every file is written atomically; a state directory appears under its final name only when complete.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <string>

#include "train/train_config.h"

namespace rwkvx::train {

struct TrainProgress {
  int64_t step = 0;         // optimizer steps done (counting those before a resume)
  int64_t total_steps = 0;  // planned steps of the whole run
  int64_t run_steps = 0;    // steps done by this process
  double loss = 0, lr = 0, grad_norm = 0;
  double tokens_per_s = 0;  // this process's average
  double elapsed_s = 0, eta_s = 0;
};

struct TrainRunOptions {
  std::string resume;  // "" or a state directory (state-N/), its state.json, or an out_dir holding states
  std::function<void(const std::string&)> log;           // informational lines (without newline)
  std::function<void(const TrainProgress&)> progress;    // after every step
  const std::atomic<bool>* stop = nullptr;               // set (e.g. by SIGINT): save a state and return
};

struct TrainResult {
  int64_t steps = 0;        // optimizer steps done in total
  bool stopped = false;     // ended by `stop`, not by the plan
  std::string last_state;   // the state directory written last
};

TrainResult run_training(const TrainConfig& config, const TrainRunOptions& options);

}  // namespace rwkvx::train
