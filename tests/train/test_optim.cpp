// AdamW (spec system.md §4.5) against hand-computed updates, the official parameter groups, gradient
// clipping, stage-1 freezing (frozen tensors bit-identical), and the LR schedules of §4.6.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "train/optimizer.h"
#include "train/schedule.h"
#include "train/train_model.h"

namespace rwkvx::train {
namespace {

TrainModel tiny(uint64_t seed) {
  RandomModelSpec s;
  s.n_vocab = 16, s.n_embd = 64, s.head_size = 32, s.n_rwkv = 2, s.n_sparse = 2;
  s.dim_w = s.dim_a = s.dim_v = s.dim_g = 8;
  s.seed = seed;
  ModelOptions o;
  o.chunk = 4;
  o.top_k = 2;
  TrainModel m = TrainModel::random(s, o);
  m.config().sparse.head_dim = 16;
  return m;
}

TEST(OptimGroups, OfficialAndBlinkDl) {
  struct Case {
    const char* name;
    std::vector<int64_t> shape;
    bool rwkvx_decay, blink_decay;
    double blink_lr;
  };
  const Case cases[] = {
      {"rwkv.emb.weight", {16, 64}, true, true, 1},
      {"rwkv.head.weight", {16, 64}, true, true, 1},
      {"rwkv.blocks.0.att.key.weight", {64, 64}, true, true, 1},
      {"rwkv.blocks.0.att.w1", {64, 8}, true, false, 1},   // LoRA: decays officially, not in BlinkDL
      {"rwkv.blocks.0.att.r_k", {2, 32}, true, false, 1},
      {"rwkv.blocks.0.att.w0", {1, 1, 64}, false, false, 2},  // squeezed to 1-d; BlinkDL doubles its lr
      {"rwkv.blocks.0.att.x_r", {1, 1, 64}, false, false, 1},
      {"rwkv.blocks.0.ln1.weight", {64}, false, false, 1},
      {"moba.0.ffn.x_k", {1, 1, 64}, false, false, 1},
      {"moba.0.att.output.weight", {64, 64}, true, true, 1},
  };
  for (const Case& c : cases) {
    const ParamGroup a = param_group(c.name, c.shape, GroupRule::rwkvx);
    const ParamGroup b = param_group(c.name, c.shape, GroupRule::blinkdl);
    EXPECT_EQ(a.decay, c.rwkvx_decay) << c.name;
    EXPECT_EQ(a.lr_scale, 1.0) << c.name;
    EXPECT_EQ(b.decay, c.blink_decay) << c.name;
    EXPECT_EQ(b.lr_scale, c.blink_lr) << c.name;
  }
}

// Two steps against the textbook AdamW (decoupled decay, bias correction), written out here in double.
TEST(OptimAdamW, MatchesHandComputedUpdate) {
  TrainModel m = tiny(1);
  AdamWOptions o;
  o.beta1 = 0.9, o.beta2 = 0.99, o.eps = 1e-8, o.weight_decay = 0.1, o.grad_clip = 0;
  AdamW opt(m, o);
  const size_t decayed = m.index("rwkv.blocks.1.att.value.weight"), plain = m.index("rwkv.blocks.1.ln2.bias");
  const double lr1 = 1e-2, lr2 = 3e-3;
  auto grad_of = [](size_t k, int step) { return 0.01 * double(int(k % 7) - 3) + (step == 2 ? 0.02 : 0.0); };
  for (size_t i : {decayed, plain}) {
    const std::vector<float> p0 = m.value(i);
    std::vector<double> expect(p0.size());
    for (size_t k = 0; k < p0.size(); ++k) {
      const double wd = i == decayed ? 0.1 : 0.0, g1 = double(float(grad_of(k, 1))), g2 = double(float(grad_of(k, 2)));
      double p = p0[k], mm = 0.1 * g1, vv = 0.01 * g1 * g1;
      p -= lr1 * ((mm / 0.1) / (std::sqrt(vv) / std::sqrt(0.01) + 1e-8) + wd * p);
      mm = 0.9 * mm + 0.1 * g2, vv = 0.99 * vv + 0.01 * g2 * g2;
      p -= lr2 * ((mm / (1 - 0.81)) / (std::sqrt(vv) / std::sqrt(1 - 0.9801) + 1e-8) + wd * p);
      expect[k] = p;
    }
    for (int step = 1; step <= 2; ++step) {
      for (size_t j = 0; j < m.n_params(); ++j)
        for (size_t k = 0; k < m.grad(j).size(); ++k) m.grad(j)[k] = float(grad_of(k, step));
      opt.step(step == 1 ? lr1 : lr2, 0.1);
    }
    for (size_t k = 0; k < p0.size(); ++k)
      ASSERT_NEAR(m.value(i)[k], expect[k], 1e-6 * std::fabs(expect[k]) + 1e-7) << k;
    m = tiny(1);
    opt = AdamW(m, o);
  }
}

// Global-norm clipping over the trainable tensors, as torch clip_grad_norm_: ×clip / (norm + 1e-6).
TEST(OptimAdamW, ClipsToGlobalNorm) {
  TrainModel m = tiny(2);
  m.freeze_all_but_sparse();
  AdamWOptions o;
  o.grad_clip = 1.0;
  AdamW opt(m, o);
  double sq = 0;
  for (size_t i = 0; i < m.n_params(); ++i) {
    std::fill(m.grad(i).begin(), m.grad(i).end(), m.param(i).trainable ? 0.5f : 100.0f);  // frozen: ignored
    if (m.param(i).trainable) sq += 0.25 * double(m.param(i).numel);
  }
  const double norm = opt.step(1e-3);
  EXPECT_NEAR(norm, std::sqrt(sq), 1e-9 * norm);
  for (size_t i = 0; i < m.n_params(); ++i)
    if (m.param(i).trainable) {
      EXPECT_NEAR(m.grad(i)[0], 0.5 / (std::sqrt(sq) + 1e-6), 1e-9) << m.param(i).name;
    }
  // Below the threshold nothing is scaled.
  for (size_t i = 0; i < m.n_params(); ++i) std::fill(m.grad(i).begin(), m.grad(i).end(), 0.0f);
  m.grad(m.index("moba.0.ln1.bias"))[0] = 0.5f;
  EXPECT_NEAR(opt.step(1e-3), 0.5, 1e-12);
  EXPECT_EQ(m.grad(m.index("moba.0.ln1.bias"))[0], 0.5f);
}

// Stage 1: every rwkv.* tensor frozen. Its gradient is never computed, AdamW (with weight decay) leaves
// it bit-identical over several steps, and every moba.* tensor moves.
TEST(OptimFreeze, StageOneChangesOnlySparseBlocks) {
  TrainModel m = tiny(3);
  m.freeze_all_but_sparse();
  std::vector<std::vector<float>> before;
  for (size_t i = 0; i < m.n_params(); ++i) before.push_back(m.value(i));
  AdamW opt(m, AdamWOptions{});
  std::mt19937_64 rng(4);
  std::vector<int32_t> seq(25);
  for (auto& x : seq) x = int32_t(rng() % 16);
  for (int step = 0; step < 3; ++step) {
    m.zero_grad();
    m.forward_backward(seq.data(), seq.data() + 1, 24, LossOptions{});
    for (size_t i = 0; i < m.n_params(); ++i) {
      if (m.param(i).trainable) continue;
      for (float g : m.grad(i)) ASSERT_EQ(g, 0.0f) << m.param(i).name;
    }
    opt.step(1e-3, 0.01);
  }
  int frozen = 0, trained = 0;
  for (size_t i = 0; i < m.n_params(); ++i) {
    const bool moba = m.param(i).name.starts_with("moba.");
    EXPECT_EQ(m.param(i).trainable, moba) << m.param(i).name;
    const bool same = std::memcmp(before[i].data(), m.value(i).data(), before[i].size() * sizeof(float)) == 0;
    if (moba) {
      EXPECT_FALSE(same) << m.param(i).name;
      ++trained;
    } else {
      EXPECT_TRUE(same) << m.param(i).name;
      ++frozen;
    }
  }
  EXPECT_EQ(trained, 2 * 11);  // ln1, ln2 (w, b), q/k/v/o, ffn x_k/key/value
  EXPECT_GT(frozen, 50);
  // Freezing after the optimizer was made is refused rather than silently training a frozen tensor.
  m.set_trainable([](const std::string&) { return false; });
  EXPECT_THROW(opt.step(1e-3), Error);
}

// Exact resume needs only the weights (an f32 safetensors file is lossless), the moments and the step
// count: the loss curve after restoring them into a fresh model and optimizer equals the uninterrupted one.
TEST(OptimAdamW, ResumeFromStateIsExact) {
  std::mt19937_64 rng(5);
  std::vector<int32_t> seq(41);
  for (auto& x : seq) x = int32_t(rng() % 16);
  AdamWOptions o;
  o.eps = 1e-8;
  PretrainSchedule sched;
  sched.lr_init = sched.lr_final = 1e-3, sched.warmup_steps = 3;
  auto run = [&](TrainModel& m, AdamW& opt, int from, int to, std::vector<double>& losses) {
    for (int step = from; step < to; ++step) {
      m.zero_grad();
      losses.push_back(m.forward_backward(seq.data() + step % 8, seq.data() + step % 8 + 1, 32, LossOptions{}).loss);
      const ScheduleValue v = pretrain_schedule(sched, step);
      opt.step(v.lr, v.wd);
    }
  };
  TrainModel a = tiny(6);
  AdamW oa(a, o);
  std::vector<double> whole, resumed;
  run(a, oa, 0, 8, whole);

  TrainModel b = tiny(6);
  AdamW ob(b, o);
  run(b, ob, 0, 5, resumed);
  const std::string path = testing::TempDir() + "rwkvx_resume.safetensors";
  b.save_safetensors(path, DType::f32);
  ModelOptions mo;
  mo.chunk = 4;
  mo.top_k = 2;
  TrainModel c = TrainModel::load(path, mo);
  c.config().sparse.head_dim = 16;
  AdamW oc(c, o);
  for (size_t i = 0; i < c.n_params(); ++i) oc.exp_avg(i) = ob.exp_avg(i), oc.exp_avg_sq(i) = ob.exp_avg_sq(i);
  oc.set_steps(ob.steps());
  run(c, oc, 5, 8, resumed);
  ASSERT_EQ(whole.size(), resumed.size());
  for (size_t i = 0; i < whole.size(); ++i) EXPECT_EQ(whole[i], resumed[i]) << "step " << i;
  for (size_t i = 0; i < a.n_params(); ++i) ASSERT_EQ(a.value(i), c.value(i)) << a.param(i).name;
  EXPECT_NE(whole[7], whole[0]);
  std::remove(path.c_str());
}

TEST(OptimSchedule, OfficialPretrainConstantWithWarmupAndTokenExit) {
  // Stage 1 script: lr 1e-5 constant, warmup 10, ctx 512 × 16, exit at 1.498B tokens.
  PretrainSchedule s;
  s.lr_init = s.lr_final = 1e-5, s.warmup_steps = 10, s.ctx_len = 512, s.global_batch = 16;
  s.exit_tokens = 1498000000, s.epoch_steps = 1000, s.epoch_count = 183;
  EXPECT_NEAR(pretrain_schedule(s, 0).lr, 1e-7, 1e-20);
  EXPECT_NEAR(pretrain_schedule(s, 5).lr, 1e-5 * (0.01 + 0.99 * 0.5), 1e-18);
  EXPECT_NEAR(pretrain_schedule(s, 10).lr, 1e-5, 1e-18);
  EXPECT_NEAR(pretrain_schedule(s, 90000).lr, 1e-5, 1e-18);
  EXPECT_EQ(pretrain_schedule(s, 90000).wd, 1e-3);
  // prog = (step - 10)·8192 / (1.498e9 - 81920) reaches 1 at step 182,862.
  EXPECT_FALSE(pretrain_schedule(s, 182861).exit);
  EXPECT_TRUE(pretrain_schedule(s, 182862).exit);
}

TEST(OptimSchedule, ExponentialCosineAndWeightDecay) {
  PretrainSchedule s;
  s.lr_init = 1e-3, s.lr_final = 1e-4, s.warmup_steps = 0, s.epoch_steps = 10, s.epoch_count = 2;
  s.weight_decay = 0.1, s.weight_decay_final = 0.01;
  // prog = (step + 1) / 20; lr = 1e-3 · 0.1^prog; wd = 0.1 · 0.1^prog.
  ScheduleValue v = pretrain_schedule(s, 9);
  EXPECT_NEAR(v.lr, 1e-3 * std::pow(0.1, 0.5), 1e-15);
  EXPECT_NEAR(v.wd, 0.1 * std::pow(0.1, 0.5), 1e-15);
  EXPECT_NEAR(pretrain_schedule(s, 30).lr, 1e-4, 1e-15);
  // Token cosine, negative exit_tokens: the mean of the exponential and the cosine.
  s.exit_tokens = -2000, s.ctx_len = 10, s.global_batch = 10, s.weight_decay_final = 0;
  v = pretrain_schedule(s, 9);  // cosine prog = 9·100 / 2000 = 0.45; exponential prog = 0.5
  const double cosine = 1e-3 * ((0.5 + 0.05) + (0.5 - 0.05) * std::cos(M_PI * 0.45));
  EXPECT_NEAR(v.lr, (1e-3 * std::pow(0.1, 0.5) + cosine) / 2, 1e-15);
  EXPECT_EQ(v.wd, 0.1);
  EXPECT_FALSE(v.exit);
  // Resuming (epoch_begin) moves real_step but the warmup follows global_step (re-warms, as officially).
  s.warmup_steps = 4, s.epoch_begin = 1, s.exit_tokens = 0;
  EXPECT_NEAR(pretrain_schedule(s, 0).lr, 0.01 * 1e-3 * std::pow(0.1, (10.0 - 4 + 1) / (20.0 - 4)), 1e-15);
}

TEST(OptimSchedule, SftCosine) {
  SftSchedule s;  // official: 2e-5 → 1e-5 over 2 × 1000 steps, no warmup
  EXPECT_NEAR(sft_schedule(s, 999).lr, 1.5e-5, 1e-15);  // prog = 1000 / 2000
  EXPECT_NEAR(sft_schedule(s, 1999).lr, 1e-5, 1e-15);
  s.warmup_steps = 10;
  EXPECT_NEAR(sft_schedule(s, 5).lr, 2e-5 * (0.1 + 0.9 * 0.5), 1e-15);  // prog still 0 inside the warmup
  EXPECT_NEAR(sft_schedule(s, 1004).lr, 1e-5 + 1e-5 * 0.5 * (1 + std::cos(M_PI * 995.0 / 1990.0)), 1e-15);
}

}  // namespace
}  // namespace rwkvx::train
