// Losses of spec system.md §4.4 beyond their gradients (those are in test_grad_*): the LongCE window plan
// and weights, the SFT masked mean, batch scaling, left padding, and what the logged loss contains.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "train/train_model.h"

namespace rwkvx::train {
namespace {

TrainModel small_rwkvx(uint64_t seed) {
  RandomModelSpec s;
  s.n_vocab = 20, s.n_embd = 64, s.head_size = 16, s.n_rwkv = 2, s.n_sparse = 1;
  s.dim_w = s.dim_a = s.dim_v = s.dim_g = 8;
  s.seed = seed;
  ModelOptions o;
  o.chunk = 4;
  o.top_k = 2;
  TrainModel m = TrainModel::random(s, o);
  m.config().sparse.head_dim = 16;
  return m;
}

std::vector<int32_t> random_ids(int64_t n, int64_t V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = int32_t(rng() % uint64_t(V));
  return v;
}

// CE from raw logits, independently of the loss code.
double ce_of(const std::vector<float>& logits, int64_t row, int64_t V, int32_t target) {
  double mx = -INFINITY, sum = 0;
  for (int64_t i = 0; i < V; ++i) mx = std::max(mx, double(logits[size_t(row * V + i)]));
  for (int64_t i = 0; i < V; ++i) sum += std::exp(double(logits[size_t(row * V + i)]) - mx);
  return mx + std::log(sum) - double(logits[size_t(row * V + target)]);
}

TEST(LossLongCe, OfficialWindowPlan) {
  // L = 64000 with the official constants: 14 short forwards of 8000 tokens scoring 8000..63999.
  const auto w = longce_windows(64000, LongCeParams{});
  ASSERT_EQ(w.size(), 14u);
  int64_t next = 8000;
  for (const LongCeWindow& x : w) {
    EXPECT_EQ(x.begin + 4000, next);
    EXPECT_EQ(x.end - x.begin, 8000);
    EXPECT_EQ(x.n, 4000);
    next += x.n;
  }
  EXPECT_EQ(next, 64000);
  EXPECT_TRUE(longce_windows(4096, LongCeParams{}).empty());
  EXPECT_TRUE(longce_windows(8000, LongCeParams{}).empty());
  const auto one = longce_windows(8001, LongCeParams{});
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].begin, 4000);
  EXPECT_EQ(one[0].end, 8001);
  EXPECT_EQ(one[0].n, 1);
  EXPECT_DOUBLE_EQ(longce_weight(2.0, 1.5, 10), std::exp(0.5));
  EXPECT_EQ(longce_weight(5.0, 1.0, 10), 10.0);
}

// Every weight equals min(exp(ℓ_short - ℓ_full), cap) with both CEs recomputed here from the logits of
// a full forward and of a fresh forward over the window.
TEST(LossLongCe, WeightsFromShortForwards) {
  TrainModel m = small_rwkvx(1);
  const int64_t T = 30, V = 20;
  const std::vector<int32_t> seq = random_ids(T + 1, V, 2);
  const std::vector<int32_t> ids(seq.begin(), seq.end() - 1), tg(seq.begin() + 1, seq.end());
  LossOptions opt;
  opt.kind = LossKind::longce;
  opt.longce = LongCeParams{9, 7, 1.3};  // windows s = 9 (scores 18..24), s = 16 (scores 25..29)
  const std::vector<double> w = m.longce_weights(ids.data(), tg.data(), T, opt);
  const std::vector<float> full = m.logits(ids.data(), T);
  int scored = 0;
  for (const LongCeWindow& win : longce_windows(T, opt.longce)) {
    const std::vector<float> shrt = m.logits(ids.data() + win.begin, win.end - win.begin);
    for (int64_t i = 0; i < win.n; ++i) {
      const int64_t t = win.begin + 9 + i;
      const double ls = ce_of(shrt, 9 + i, V, tg[size_t(t)]), lf = ce_of(full, t, V, tg[size_t(t)]);
      // 1e-6: the float model's CE takes its exponentials in fp32 (train/ops/fast.h; measured ~1e-8 off the
      // double CE of the same logits), while a weight from the wrong window is off by ~0.1.
      EXPECT_NEAR(w[size_t(t)], std::min(std::exp(ls - lf), 1.3), 1e-6) << t;
      ++scored;
    }
  }
  EXPECT_EQ(scored, 12);
  for (int64_t t = 0; t < 18; ++t) EXPECT_EQ(w[size_t(t)], 1.0);
  // The weighted loss: Σ w ℓ / T, with ℓ the full forward's CE.
  m.zero_grad();
  const LossReport rep = m.forward_backward(ids.data(), tg.data(), T, opt);
  double expect = 0, plain = 0;
  for (int64_t t = 0; t < T; ++t) {
    expect += w[size_t(t)] * ce_of(full, t, V, tg[size_t(t)]) / double(T);
    plain += ce_of(full, t, V, tg[size_t(t)]) / double(T);
  }
  EXPECT_NEAR(rep.loss, expect, 1e-6);
  EXPECT_NEAR(rep.mean_ce, plain, 1e-6);
}

// SFT: Σ over labelled positions / max(1, #labelled), mean over the batch; L2Wrap is in the gradient
// but never in the reported loss.
TEST(LossSft, MaskedMeanAndBatch) {
  TrainModel m = small_rwkvx(3);
  const int64_t T = 12;
  const std::vector<int32_t> ids = random_ids(T, 20, 4);
  std::vector<int32_t> tg = random_ids(T, 20, 5);
  for (int64_t t : {0, 1, 2, 7}) tg[size_t(t)] = -100;
  LossOptions opt;
  opt.reduction = LossReduction::mean_valid;
  opt.batch_size = 4;
  const std::vector<double> l = m.position_losses(ids.data(), tg.data(), T, opt);
  double sum = 0;
  for (int64_t t = 0; t < T; ++t) sum += tg[size_t(t)] < 0 ? 0.0 : l[size_t(t)];
  m.zero_grad();
  const LossReport rep = m.forward_backward(ids.data(), tg.data(), T, opt);
  EXPECT_EQ(rep.n_scored, 8);
  EXPECT_NEAR(rep.loss, sum / (4.0 * 8.0), 1e-12);
  LossOptions no_l2 = opt;
  no_l2.l2wrap = false;
  EXPECT_EQ(m.forward_backward(ids.data(), tg.data(), T, no_l2).loss, rep.loss);
  // Nothing labelled: zero loss, and without L2Wrap a zero gradient.
  std::vector<int32_t> none(static_cast<size_t>(T), -100);
  m.zero_grad();
  EXPECT_EQ(m.forward_backward(ids.data(), none.data(), T, no_l2).loss, 0.0);
  for (size_t i = 0; i < m.n_params(); ++i)
    for (float g : m.grad(i)) ASSERT_EQ(g, 0.0f) << m.param(i).name;
}

// B sequences of a batch: each call's loss and gradient (CE and L2Wrap alike) carry 1/(B·T).
TEST(LossCe, BatchSizeScalesLossAndGradient) {
  TrainModel a = small_rwkvx(6), b = small_rwkvx(6);
  const int64_t T = 10;
  const std::vector<int32_t> ids = random_ids(T, 20, 7), tg = random_ids(T, 20, 8);
  LossOptions o1, o3;
  o3.batch_size = 3;
  a.zero_grad(), b.zero_grad();
  const double l1 = a.forward_backward(ids.data(), tg.data(), T, o1).loss;
  const double l3 = b.forward_backward(ids.data(), tg.data(), T, o3).loss;
  EXPECT_NEAR(l3 * 3, l1, 1e-12 * l1);
  // Per tensor max |3·g_B3 - g_B1| / max |g_B1| (float: cancellations round differently at 1/3 the scale).
  for (size_t i = 0; i < a.n_params(); ++i) {
    double num = 0, den = 0;
    for (size_t k = 0; k < a.grad(i).size(); ++k) {
      num = std::max(num, std::fabs(3.0 * double(b.grad(i)[k]) - double(a.grad(i)[k])));
      den = std::max(den, std::fabs(double(a.grad(i)[k])));
    }
    EXPECT_GT(den, 0.0) << a.param(i).name;
    EXPECT_LE(num, 1e-5 * den) << a.param(i).name;
  }
}

// Left padding (spec §4.3): the pad tokens run through the model (chunks anchored at the first pad) and
// are not scored, so the losses equal those of the explicitly prepended sequence at the real positions.
TEST(LossCe, LeftPaddingRunsPadTokens) {
  TrainModel m = small_rwkvx(9);
  const int64_t T = 11;
  const std::vector<int32_t> ids = random_ids(T, 20, 10), tg = random_ids(T, 20, 11);
  LossOptions opt;
  opt.pad_multiple = 8;
  opt.pad_id = 19;
  const std::vector<double> padded = m.position_losses(ids.data(), tg.data(), T, opt);
  std::vector<int32_t> ids2(5, 19), tg2(5, -1);
  ids2.insert(ids2.end(), ids.begin(), ids.end());
  tg2.insert(tg2.end(), tg.begin(), tg.end());
  const std::vector<double> manual = m.position_losses(ids2.data(), tg2.data(), T + 5, LossOptions{});
  ASSERT_EQ(padded.size(), size_t(T));
  for (int64_t t = 0; t < T; ++t) EXPECT_EQ(padded[size_t(t)], manual[size_t(t + 5)]) << t;
  const std::vector<double> unpadded = m.position_losses(ids.data(), tg.data(), T, LossOptions{});
  EXPECT_NE(padded, unpadded);
  opt.pad_id = 20;
  EXPECT_THROW(m.position_losses(ids.data(), tg.data(), T, opt), Error);
}

}  // namespace
}  // namespace rwkvx::train
