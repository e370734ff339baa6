// End to end on the CPU: a tiny random RWKV-X (2 RWKV blocks + 1 sparse block with several chunks and
// top-k selection) trained with AdamW, the official schedule shape (warmup then constant) and CE + L2Wrap
// on a repetitive synthetic sequence lowers its loss on a held-out stretch of the same process.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>

#include "train/optimizer.h"
#include "train/schedule.h"
#include "train/train_model.h"

namespace rwkvx::train {
namespace {

// Period-12 pattern whose bigrams are ambiguous (1 → 4 or 5, 5 → 9, 3 or 8), so predicting it needs
// more than the previous token.
std::vector<int32_t> pattern(int64_t n, int64_t phase) {
  static const int32_t p[12] = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8};
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = p[(i + phase) % 12];
  return v;
}

double heldout_loss(const TrainModel& m, const std::vector<int32_t>& seq) {
  const int64_t T = int64_t(seq.size()) - 1;
  const std::vector<double> l = m.position_losses(seq.data(), seq.data() + 1, T, LossOptions{});
  double s = 0;
  for (double x : l) s += x;
  return s / double(T);
}

TEST(OptimTraining, TinyModelLearnsRepetitiveSequence) {
  RandomModelSpec spec;
  spec.n_vocab = 16, spec.n_embd = 64, spec.head_size = 32, spec.n_rwkv = 2, spec.n_sparse = 1;
  spec.dim_w = spec.dim_a = spec.dim_v = spec.dim_g = 8;
  spec.seed = 42;
  ModelOptions mo;
  mo.chunk = 8;
  mo.top_k = 2;
  TrainModel m = TrainModel::random(spec, mo);
  m.config().sparse.head_dim = 16;
  m.recompute = true;  // the --grad_cp 1 path

  AdamWOptions ao;
  ao.eps = 1e-8, ao.weight_decay = 0.0, ao.grad_clip = 1.0;
  AdamW opt(m, ao);
  PretrainSchedule sched;
  sched.lr_init = sched.lr_final = 3e-3, sched.warmup_steps = 10;

  // Training: 32-token windows of the pattern at phases 0..11; held out: a 60-token stretch at phase 7
  // scored as one fresh sequence (longer than any training window, different chunk alignment).
  const std::vector<int32_t> held = pattern(61, 7);
  const double before = heldout_loss(m, held);
  const auto t0 = std::chrono::steady_clock::now();
  const int steps = 200;
  double last = 0;
  for (int step = 0; step < steps; ++step) {
    const std::vector<int32_t> seq = pattern(33, step % 12);
    m.zero_grad();
    last = m.forward_backward(seq.data(), seq.data() + 1, 32, LossOptions{}).loss;
    opt.step(pretrain_schedule(sched, step).lr, 0.0);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double after = heldout_loss(m, held);
  RecordProperty("heldout_before", std::to_string(before));
  RecordProperty("heldout_after", std::to_string(after));
  RecordProperty("train_last", std::to_string(last));
  RecordProperty("seconds", std::to_string(secs));
  // Stated margin: from above 2 nats (random weights; measured 3.31) the held-out loss falls below 0.05
  // nats (measured 0.0012 after 200 steps, ~2.5 s on one core).
  EXPECT_GT(before, 2.0);
  EXPECT_LT(after, 0.05);
}

}  // namespace
}  // namespace rwkvx::train
