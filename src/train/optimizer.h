// AdamW as the official RWKV-X trainer runs it (spec system.md §4.5): DeepSpeed FusedAdam in adam_w_mode
// with bias correction, parameter groups by squeezed rank, global-norm gradient clipping, and a freeze
// mask (frozen tensors have no group and are never touched). The LR / weight-decay schedule of §4.6 is in
// schedule.h. fp32 master weights and moments.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace rwkvx::train {

template <class S>
class TrainModelT;

// Weight-decay grouping. rwkvx (the official RWKV-X code, default): every tensor whose squeezed shape has
// ≥ 2 dims decays (emb, head, Linear weights, the LoRA matrices, att.r_k), the rest do not; one lr.
// blinkdl (BlinkDL RWKV-7, an option): only 2-d "*.weight" tensors decay, and att.w0 gets 2× lr.
enum class GroupRule { rwkvx, blinkdl };

struct ParamGroup {
  bool decay = false;     // weight decay applies
  double lr_scale = 1.0;  // multiplier on the scheduled lr
};
ParamGroup param_group(const std::string& name, const std::vector<int64_t>& shape, GroupRule rule);

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.99;
  double eps = 1e-18;         // official pretrain scripts (SFT: 1e-8)
  double weight_decay = 1e-3; // official pretrain scripts (SFT: 0); the schedule may override per step
  double grad_clip = 1.0;     // global L2 norm; 0 = off
  GroupRule groups = GroupRule::rwkvx;
};

// One optimizer slot per trainable tensor, built when the optimizer is made: a tensor frozen then stays
// untouched (bit for bit) by every step.
class AdamW {
 public:
  AdamW(TrainModelT<float>& model, const AdamWOptions& options);

  // Clips the gradients of the trainable tensors to grad_clip (torch clip_grad_norm_: scale by
  // clip / (norm + 1e-6) when that is < 1), then one AdamW step with learning rate `lr` and weight decay
  // `wd` (on decaying groups). Returns the global gradient norm before clipping. Gradients are left
  // clipped; the caller zeroes them.
  double step(double lr, double wd);
  double step(double lr) { return step(lr, options_.weight_decay); }

  int64_t steps() const { return step_; }
  const AdamWOptions& options() const { return options_; }
  // Moments of tensor i (empty for frozen tensors): for checkpoints and tests.
  const std::vector<float>& exp_avg(size_t i) const { return m_[i]; }
  const std::vector<float>& exp_avg_sq(size_t i) const { return v_[i]; }
  std::vector<float>& exp_avg(size_t i) { return m_[i]; }
  std::vector<float>& exp_avg_sq(size_t i) { return v_[i]; }
  void set_steps(int64_t n) { step_ = n; }

 private:
  TrainModelT<float>* model_;
  AdamWOptions options_;
  std::vector<bool> active_;
  std::vector<ParamGroup> group_;
  std::vector<std::vector<float>> m_, v_;
  int64_t step_ = 0;
};

}  // namespace rwkvx::train
