// The CUDA training model against the CPU one (itself checked against fp64 finite differences and the
// golden logits): the same loss and gradients in double to rounding, fp64 finite differences run on the
// GPU directly, fp32 within fp32 rounding, the bf16 mixed-precision path close to fp32, bit-identical
// repeats and recomputation, device AdamW equal to the host one, stage-1 freezing, and a few hundred
// tokens of training that lower the loss. Without a GPU every test skips and says so.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "backend/cuda/cuda_backend.h"
#include "support/grad_check.h"
#include "support/test_util.h"
#include "support/tiny_train_model.h"
#include "train/cuda/cuda_train_model.h"
#include "train/optimizer.h"
#include "train/train_model.h"

namespace rwkvx::train {
namespace {

class TrainCudaModel : public testing::Test {
 public:
  void SetUp() override {
    std::string why;
    if (!cuda_device_available(&why)) GTEST_SKIP() << "no CUDA device (" << why << "): CUDA training tests skipped";
  }
};

using Sequence = test::TokenSequence;
using test::random_sequence;

// max |a - b| / max |b| (b the reference); 0 when both are all zero.
template <class S>
double rel_err(const std::vector<S>& a, const std::vector<S>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (!std::isfinite(double(a[i]))) return INFINITY;
    num = std::max(num, std::fabs(double(a[i]) - double(b[i])));
    den = std::max(den, std::fabs(double(b[i])));
  }
  return den == 0 ? num : num / den;
}

// Every gradient of the CUDA model against the CPU model's after the same forward_backward.
template <class S>
double worst_grad_err(const CudaTrainModelT<S>& gpu, const TrainModelT<S>& cpu, std::string* where) {
  double worst = 0;
  for (size_t i = 0; i < cpu.n_params(); ++i) {
    if (!cpu.param(i).trainable) continue;
    const double e = rel_err(gpu.grad(i), cpu.grad(i));
    if (e > worst) worst = e, *where = cpu.param(i).name;
  }
  return worst;
}

// Fourth-order central differences of the GPU model's objective against its own gradient, per_tensor
// random entries of every tensor (step 3e-5 as in the CPU model check, test_grad_model.cpp). Each tensor
// is restored from the CPU model afterwards.
[[gnu::noinline]] test::GradCheckResult gpu_finite_differences(CudaTrainModelT<double>& gpu,
                                                               const TrainModelT<double>& cpu, const Sequence& s,
                                                               const LossOptions& opt, int per_tensor) {
  const int64_t T = int64_t(s.ids.size());
  test::GradCheckResult res;
  for (size_t i = 0; i < gpu.n_params(); ++i) {
    std::vector<double> x = gpu.value(i);
    const std::vector<double> analytic = gpu.grad(i);
    test::grad_check(gpu.param(i).name, x, analytic,
                     [&] {
                       gpu.set_value(i, x);
                       return gpu.objective(s.ids.data(), s.targets.data(), nullptr, T, opt);
                     },
                     res, per_tensor, 1e-5, 3e-5);
    gpu.set_value(i, cpu.value(i));
  }
  return res;
}

TEST_F(TrainCudaModel, DoubleMatchesCpuAndFiniteDifferences) {
  TrainModelT<double> cpu = test::tiny_train_model<double>(3);
  CudaTrainModelT<double> gpu(cpu, CudaTrainOptions{});
  Sequence s = random_sequence(14, 24, 4);
  s.targets[5] = -100;
  LossOptions opt;
  opt.pad_multiple = 8;
  opt.pad_id = 23;
  opt.batch_size = 2;
  cpu.zero_grad();
  const LossReport rc = cpu.forward_backward(s.ids.data(), s.targets.data(), 14, opt);
  const LossReport rg = gpu.forward_backward(s.ids.data(), s.targets.data(), 14, opt);
  EXPECT_NEAR(rg.loss, rc.loss, 1e-12 * std::fabs(rc.loss));
  EXPECT_EQ(rg.n_scored, rc.n_scored);
  std::string where;
  EXPECT_LE(worst_grad_err(gpu, cpu, &where), 1e-10) << where;
  // Finite differences of the GPU objective itself, one entry per tensor (fp64 on the GPU).
  const test::GradCheckResult res = gpu_finite_differences(gpu, cpu, s, opt, 1);
  RecordProperty("worst_fd_rel_err", std::to_string(res.worst));
  EXPECT_GE(res.checked, int(gpu.n_params()));
  EXPECT_LE(res.worst, 1e-5) << res.where;
}

TEST_F(TrainCudaModel, LongCeDoubleMatchesCpu) {
  TrainModelT<double> cpu = test::tiny_train_model<double>(5);
  CudaTrainModelT<double> gpu(cpu, CudaTrainOptions{});
  const Sequence s = random_sequence(16, 24, 6);
  LossOptions opt;
  opt.kind = LossKind::longce;
  opt.longce = LongCeParams{4, 4, 1.1};
  cpu.zero_grad();
  const LossReport rc = cpu.forward_backward(s.ids.data(), s.targets.data(), 16, opt);
  const LossReport rg = gpu.forward_backward(s.ids.data(), s.targets.data(), 16, opt);
  EXPECT_NEAR(rg.loss, rc.loss, 1e-12 * std::fabs(rc.loss));
  std::string where;
  EXPECT_LE(worst_grad_err(gpu, cpu, &where), 1e-10) << where;
  const std::vector<double> pc = cpu.position_losses(s.ids.data(), s.targets.data(), 16, opt);
  EXPECT_LE(rel_err(gpu.position_losses(s.ids.data(), s.targets.data(), 16, opt), pc), 1e-12);
}

TEST_F(TrainCudaModel, PlainRwkv7MaskedMeanDouble) {
  RandomModelSpec spec;
  spec.n_vocab = 24, spec.n_embd = 32, spec.head_size = 16, spec.n_rwkv = 3, spec.n_sparse = 0;
  spec.dim_w = spec.dim_a = spec.dim_v = spec.dim_g = 8;
  spec.seed = 12;
  TrainModelT<double> cpu = TrainModelT<double>::random(spec, ModelOptions{});
  cpu.wkv_save_every = 4;
  CudaTrainModelT<double> gpu(cpu, CudaTrainOptions{});
  Sequence s = random_sequence(10, 24, 13);
  s.targets[0] = s.targets[1] = s.targets[6] = -100;
  LossOptions opt;
  opt.reduction = LossReduction::mean_valid;
  cpu.zero_grad();
  const LossReport rc = cpu.forward_backward(s.ids.data(), s.targets.data(), 10, opt);
  const LossReport rg = gpu.forward_backward(s.ids.data(), s.targets.data(), 10, opt);
  EXPECT_EQ(rg.n_scored, 7);
  EXPECT_NEAR(rg.loss, rc.loss, 1e-12 * std::fabs(rc.loss));
  std::string where;
  EXPECT_LE(worst_grad_err(gpu, cpu, &where), 1e-10) << where;
}

// fp32 with exact cuBLAS products against the CPU fp32 trainer, on head size 64 and 100 tokens
// (6 sparse chunks); and the golden checkpoints' logits.
TEST_F(TrainCudaModel, Fp32MatchesCpu) {
  TrainModel cpu = test::small_train_model(21);
  CudaTrainOptions o;
  o.bf16_gemm = false;
  CudaTrainModel gpu(cpu, o);
  const Sequence s = random_sequence(100, 300, 22);
  LossOptions opt;
  cpu.zero_grad();
  const LossReport rc = cpu.forward_backward(s.ids.data(), s.targets.data(), 100, opt);
  const LossReport rg = gpu.forward_backward(s.ids.data(), s.targets.data(), 100, opt);
  EXPECT_NEAR(rg.loss, rc.loss, 1e-5 * std::fabs(rc.loss));
  std::string where;
  const double e = worst_grad_err(gpu, cpu, &where);
  RecordProperty("worst_grad_rel_err", std::to_string(e));
  EXPECT_LE(e, 2e-4) << where;
}

TEST_F(TrainCudaModel, GoldenLogitsFp32) {
  for (const char* name : {"rwkv7-tiny", "rwkvx-tiny"}) {
    const std::string dir = test::golden_dir(name);
    nlohmann::json cas = nlohmann::json::parse(std::ifstream(dir + "/case.json"));
    const std::vector<int32_t> ids = cas["tokens"].get<std::vector<int32_t>>();
    ModelOptions mo;
    mo.chunk = cas["config"]["chunk"].get<int>();
    mo.top_k = cas["config"]["topk"].get<int>();
    TrainModel host = TrainModel::load(dir + "/model.safetensors", mo);
    CudaTrainOptions o;
    o.bf16_gemm = false;
    CudaTrainModel gpu(host, o);
    const std::vector<float> got = gpu.logits(ids.data(), int64_t(ids.size()));
    const double err = test::rel_max_err(got, test::read_f32_file(dir + "/logits.f32"));
    RecordProperty(std::string("rel_err_") + name, std::to_string(err));
    EXPECT_LE(err, 1e-4) << name;
  }
}

// bf16 operands (the default) stay close to fp32: loss within 1%, every gradient tensor within a cosine
// of 0.99 of the fp32 one.
TEST_F(TrainCudaModel, Bf16CloseToFp32) {
  TrainModel host = test::small_train_model(31);
  CudaTrainOptions exact;
  exact.bf16_gemm = false;
  CudaTrainModel a(host, exact), b(host, CudaTrainOptions{});
  const Sequence s = random_sequence(100, 300, 32);
  const LossReport ra = a.forward_backward(s.ids.data(), s.targets.data(), 100, LossOptions{});
  const LossReport rb = b.forward_backward(s.ids.data(), s.targets.data(), 100, LossOptions{});
  EXPECT_NEAR(rb.loss, ra.loss, 1e-2 * ra.loss);
  for (size_t i = 0; i < host.n_params(); ++i) {
    const std::vector<float> ga = a.grad(i), gb = b.grad(i);
    double dot = 0, na = 0, nb = 0;
    for (size_t k = 0; k < ga.size(); ++k) dot += double(ga[k]) * gb[k], na += double(ga[k]) * ga[k], nb += double(gb[k]) * gb[k];
    if (na == 0) continue;
    EXPECT_GE(dot / std::sqrt(na * nb), 0.99) << host.param(i).name;
  }
}

// Same inputs, same bits: repeated steps, and activation recomputation, give identical gradients.
TEST_F(TrainCudaModel, RepeatAndRecomputeAreBitIdentical) {
  TrainModel host = test::small_train_model(41);
  const Sequence s = random_sequence(90, 300, 42);
  std::vector<std::vector<float>> ref;
  for (int variant = 0; variant < 3; ++variant) {
    CudaTrainModel gpu(host, CudaTrainOptions{});
    gpu.recompute = variant == 2;
    gpu.forward_backward(s.ids.data(), s.targets.data(), 90, LossOptions{});
    for (size_t i = 0; i < host.n_params(); ++i) {
      if (variant == 0) {
        ref.push_back(gpu.grad(i));
      } else {
        ASSERT_EQ(gpu.grad(i), ref[i]) << host.param(i).name << " variant " << variant;
      }
    }
  }
}

// Device AdamW = host AdamW (same groups, clipping, decay), three steps from the same gradients (the GPU's,
// copied to the host model before each step).
TEST_F(TrainCudaModel, AdamWMatchesHost) {
  TrainModel cpu = test::small_train_model(51);
  CudaTrainModel gpu(cpu, CudaTrainOptions{});
  AdamWOptions ao;
  ao.grad_clip = 0.5;  // the random model's gradient norm is above it: clipping is exercised
  AdamW host_opt(cpu, ao);
  CudaAdamW dev_opt(gpu, ao);
  const Sequence s = random_sequence(40, 300, 52);
  for (int step = 0; step < 3; ++step) {
    gpu.zero_grad();
    gpu.forward_backward(s.ids.data(), s.targets.data(), 40, LossOptions{});
    gpu.download_grads(cpu);
    const double nh = host_opt.step(1e-3, 0.1), nd = dev_opt.step(1e-3, 0.1);
    EXPECT_NEAR(nd, nh, 1e-9 * nh) << "step " << step;
    EXPECT_GT(nh, 0.5);
  }
  for (size_t i = 0; i < cpu.n_params(); ++i) {
    EXPECT_LE(rel_err(gpu.value(i), cpu.value(i)), 1e-6) << cpu.param(i).name;
    EXPECT_LE(rel_err(dev_opt.exp_avg(i), host_opt.exp_avg(i)), 1e-6) << cpu.param(i).name;
    EXPECT_LE(rel_err(dev_opt.exp_avg_sq(i), host_opt.exp_avg_sq(i)), 1e-6) << cpu.param(i).name;
  }
}

// Stage 1 (spec system.md §4.5): only moba.* tensors change; every other tensor stays bit-identical.
TEST_F(TrainCudaModel, StageOneChangesOnlySparseBlocks) {
  TrainModel host = test::small_train_model(61);
  host.freeze_all_but_sparse();
  CudaTrainModel gpu(host, CudaTrainOptions{});
  CudaAdamW opt(gpu, AdamWOptions{});
  const Sequence s = random_sequence(60, 300, 62);
  for (int step = 0; step < 3; ++step) {
    gpu.zero_grad();
    gpu.forward_backward(s.ids.data(), s.targets.data(), 60, LossOptions{});
    opt.step(1e-3, 1e-3);
  }
  int changed = 0;
  for (size_t i = 0; i < host.n_params(); ++i) {
    const bool same = gpu.value(i) == host.value(i);
    if (host.param(i).name.starts_with("moba.")) {
      changed += !same;
    } else {
      EXPECT_TRUE(same) << host.param(i).name;
    }
  }
  EXPECT_GT(changed, 5);
}

// A few dozen steps on a short repeated text lower its loss a lot (the whole loop works end to end).
TEST_F(TrainCudaModel, TrainingLowersLoss) {
  TrainModel host = test::small_train_model(71);
  CudaTrainModel gpu(host, CudaTrainOptions{});
  CudaAdamW opt(gpu, AdamWOptions{});
  Sequence s = random_sequence(64, 300, 72);
  double first = 0, last = 0;
  for (int step = 0; step < 40; ++step) {
    gpu.zero_grad();
    const double loss = gpu.forward_backward(s.ids.data(), s.targets.data(), 64, LossOptions{}).loss;
    opt.step(3e-3, 0.0);
    if (step == 0) first = loss;
    last = loss;
  }
  RecordProperty("loss_first", std::to_string(first));
  RecordProperty("loss_last", std::to_string(last));
  EXPECT_LT(last, 0.5 * first);
}

}  // namespace
}  // namespace rwkvx::train
