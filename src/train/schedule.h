// Learning-rate and weight-decay schedules of the official trainers (spec system.md §4.6), evaluated
// before every step.
#pragma once
#include <cstdint>

namespace rwkvx::train {

// pretrain/src/trainer.py. Every official pretrain script: lr_init = lr_final = 1e-5, warmup 10.
struct PretrainSchedule {
  double lr_init = 1e-5, lr_final = 1e-5;
  int64_t warmup_steps = 10;
  int64_t epoch_steps = 1000;  // steps per mini-epoch
  int64_t epoch_count = 1;
  int64_t epoch_begin = 0;
  int64_t my_pile_edecay = 0;
  int64_t exit_tokens = 0;     // my_exit_tokens: ≠ 0 selects the token-based cosine (sign picks the mix)
  int64_t ctx_len = 512;
  int64_t global_batch = 1;    // B = micro_bsz × devices × nodes
  double weight_decay = 1e-3, weight_decay_final = 0;
};

// sft/src/trainer.py: cosine from lr_init to lr_final over the run; the warmup multiplies by
// 0.1 + 0.9·step/w. The lr is applied to every group (the official code skips groups with wd > 0, a
// bug that is harmless at its wd = 0; spec §4.6 [REC]).
struct SftSchedule {
  double lr_init = 2e-5, lr_final = 1e-5;
  int64_t warmup_steps = 0;
  int64_t epoch_steps = 1000;
  int64_t epoch_count = 2;
  int64_t epoch_begin = 0;
  int64_t accumulate = 1;
  double weight_decay = 0;
};

struct ScheduleValue {
  double lr = 0, wd = 0;
  double progress = 0;  // the schedule's last computed progress in [0, 1]
  bool exit = false;    // pretrain token budget reached: the official trainer saves rwkv-final and exits
};

// global_step counts optimizer steps of this run (the warmup restarts on resume, as officially).
ScheduleValue pretrain_schedule(const PretrainSchedule& s, int64_t global_step);
ScheduleValue sft_schedule(const SftSchedule& s, int64_t global_step);

}  // namespace rwkvx::train
