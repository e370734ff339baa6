// AdamW with the official parameter groups and global-norm clipping (spec system.md §4.5).
#include "train/optimizer.h"

#include <cmath>

#include "core/error.h"
#include "train/train_model.h"

namespace rwkvx::train {

ParamGroup param_group(const std::string& name, const std::vector<int64_t>& shape, GroupRule rule) {
  int squeezed = 0;
  for (int64_t d : shape) squeezed += d != 1;
  ParamGroup g;
  if (rule == GroupRule::rwkvx) {
    g.decay = squeezed >= 2;
  } else {
    g.decay = squeezed >= 2 && name.ends_with(".weight");
    if (name.ends_with("att.w0")) g.lr_scale = 2.0;
  }
  return g;
}

AdamW::AdamW(TrainModelT<float>& model, const AdamWOptions& options) : model_(&model), options_(options) {
  const size_t n = model.n_params();
  active_.resize(n), group_.resize(n), m_.resize(n), v_.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const TrainParam& p = model.param(i);
    active_[i] = p.trainable;
    group_[i] = param_group(p.name, p.shape, options.groups);
    if (p.trainable) m_[i].assign(size_t(p.numel), 0.0f), v_[i].assign(size_t(p.numel), 0.0f);
  }
}

double AdamW::step(double lr, double wd) {
  const size_t n = model_->n_params();
  for (size_t i = 0; i < n; ++i)
    if (active_[i] && !model_->param(i).trainable)
      throw Error("AdamW: tensor '" + model_->param(i).name + "' was frozen after the optimizer was made");
  double sq = 0;
  for (size_t i = 0; i < n; ++i)
    if (active_[i])
      for (float g : model_->grad(i)) sq += double(g) * double(g);
  const double norm = std::sqrt(sq);
  if (options_.grad_clip > 0) {
    const double coef = options_.grad_clip / (norm + 1e-6);
    if (coef < 1.0)
      for (size_t i = 0; i < n; ++i)
        if (active_[i])
          for (float& g : model_->grad(i)) g = float(double(g) * coef);
  }
  ++step_;
  const double b1 = options_.beta1, b2 = options_.beta2;
  const double bc1 = 1.0 - std::pow(b1, double(step_)), bc2_sqrt = std::sqrt(1.0 - std::pow(b2, double(step_)));
  for (size_t i = 0; i < n; ++i) {
    if (!active_[i]) continue;
    const double lr_i = lr * group_[i].lr_scale, wd_i = group_[i].decay ? wd : 0.0;
    std::vector<float>& p = model_->value(i);
    const std::vector<float>& g = model_->grad(i);
    std::vector<float>& m = m_[i];
    std::vector<float>& v = v_[i];
    for (size_t k = 0; k < p.size(); ++k) {
      // DeepSpeed multi_tensor_adam, ADAM_MODE_1 (decoupled decay):
      //   m = β1 m + (1-β1) g;  v = β2 v + (1-β2) g²;  denom = √v / √(1-β2^t) + ε;
      //   p -= lr ((m / (1-β1^t)) / denom + wd p)
      m[k] = float(b1 * m[k] + (1.0 - b1) * g[k]);
      v[k] = float(b2 * v[k] + (1.0 - b2) * double(g[k]) * g[k]);
      const double denom = std::sqrt(double(v[k])) / bc2_sqrt + options_.eps;
      const double update = (double(m[k]) / bc1) / denom + wd_i * double(p[k]);
      p[k] = float(double(p[k]) - lr_i * update);
    }
  }
  return norm;
}

}  // namespace rwkvx::train
