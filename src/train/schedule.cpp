// The official LR schedules, transcribed step by step from spec system.md §4.6.
#include "train/schedule.h"

#include <algorithm>
#include <cmath>

namespace rwkvx::train {

ScheduleValue pretrain_schedule(const PretrainSchedule& s, int64_t global_step) {
  ScheduleValue out;
  const double w = double(s.warmup_steps);
  const double real_step = double(global_step + s.epoch_begin * s.epoch_steps);
  double lr = s.lr_init, progress = 0;
  // 1. Base lr: exponential (or linear if either end is 0) between lr_init and lr_final.
  if (!(s.lr_final == s.lr_init || s.epoch_count == 0)) {
    const double decay_step = real_step - double(s.my_pile_edecay * s.epoch_steps);
    const double decay_total = double((s.epoch_count - s.my_pile_edecay) * s.epoch_steps);
    progress = std::clamp((decay_step - w + 1) / (decay_total - w), 0.0, 1.0);
    if (s.lr_final == 0 || s.lr_init == 0)
      lr = s.lr_init + (s.lr_final - s.lr_init) * progress;
    else
      lr = s.lr_init * std::exp(std::log(s.lr_final / s.lr_init) * progress);
  }
  // 2. Token-based cosine.
  if (s.exit_tokens != 0) {
    const double tok_per_step = double(s.ctx_len) * double(s.global_batch);
    progress = std::clamp((real_step - w) * tok_per_step / (std::fabs(double(s.exit_tokens)) - w * tok_per_step),
                          0.0, 1.0);
    const double f = s.lr_final / s.lr_init;
    const double mult = (0.5 + f / 2) + (0.5 - f / 2) * std::cos(M_PI * progress);
    lr = s.exit_tokens > 0 ? s.lr_init * mult : (lr + s.lr_init * mult) / 2;
    out.exit = progress >= 1;
  }
  // 3. Warmup on global_step (not real_step).
  if (double(global_step) < w) lr *= 0.01 + 0.99 * double(global_step) / w;
  // 4. Weight decay.
  out.wd = s.weight_decay;
  if (s.weight_decay_final > 0)
    out.wd = s.weight_decay * std::exp(std::log(s.weight_decay_final / s.weight_decay) * progress);
  out.lr = lr;
  out.progress = progress;
  return out;
}

ScheduleValue sft_schedule(const SftSchedule& s, int64_t global_step) {
  ScheduleValue out;
  const double w = double(s.warmup_steps);
  const double real_step = double(global_step * s.accumulate + s.epoch_begin * s.epoch_steps);
  const double total = double((s.epoch_begin + s.epoch_count) * s.epoch_steps);
  double lr = s.lr_init;
  if (s.lr_init != s.lr_final) {
    out.progress = std::clamp((real_step - w + 1) / (total - w), 0.0, 1.0);
    lr = s.lr_final + (s.lr_init - s.lr_final) * 0.5 * (1 + std::cos(M_PI * out.progress));
  }
  if (real_step < w) lr *= 0.1 + 0.9 * real_step / w;
  out.lr = lr;
  out.wd = s.weight_decay;
  return out;
}

}  // namespace rwkvx::train
