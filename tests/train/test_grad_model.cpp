// TrainModel: the training forward equals the inference engine on the golden checkpoints, and the whole
// model's backward (RWKV-7 blocks, sparse blocks with several chunks and real top-k selection, both
// losses) matches fp64 finite differences. Activation recomputation changes nothing.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "model/model.h"
#include "support/grad_check.h"
#include "support/tiny_train_model.h"
#include "support/test_util.h"
#include "train/train_model.h"

namespace rwkvx::train {
namespace {

// ---- forward = inference engine ----------------------------------------------------------------------

class TrainForwardGolden : public testing::TestWithParam<std::string> {};

// The training forward (float) against the reference backend's prefill logits on the same checkpoint:
// max |Δ| / max |ref| ≤ 1e-5 (measured ~1e-7; both accumulate in double and round in different places).
TEST_P(TrainForwardGolden, LogitsMatchReferenceBackend) {
  const std::string dir = test::golden_dir(GetParam());
  nlohmann::json cas = nlohmann::json::parse(std::ifstream(dir + "/case.json"));
  const std::vector<int32_t> ids = cas["tokens"].get<std::vector<int32_t>>();
  ModelOptions opt;
  opt.chunk = cas["config"]["chunk"].get<int>();
  opt.top_k = cas["config"]["topk"].get<int>();
  auto be = make_reference_backend();
  for (const char* fmt : {"safetensors", "pth"}) {
    auto model = Model::load(dir + "/model." + fmt, opt, *be);
    State st = model->new_state();
    const int64_t T = int64_t(ids.size()), V = model->config().n_vocab;
    Tensor l = model->forward(ids.data(), SeqBatch::single(T), st, LogitsMode::all);
    std::vector<float> ref(size_t(T * V));
    be->to_host(l, ref.data());
    TrainModel tm = TrainModel::load(dir + "/model." + fmt, opt);
    const std::vector<float> got = tm.logits(ids.data(), T);
    const double err = test::rel_max_err(got, ref);
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.3g", err);
    RecordProperty(std::string("rel_err_") + fmt, buf);
    EXPECT_LE(err, 1e-5) << GetParam() << " " << fmt;
    // And the golden logits of the official implementation (spec model.md §8 bar 1e-4; fp32 engines ~1e-6).
    EXPECT_LE(test::rel_max_err(got, test::read_f32_file(dir + "/logits.f32")), 2e-5) << GetParam() << " " << fmt;
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, TrainForwardGolden, testing::Values("rwkv7-tiny", "rwkvx-tiny"));

// ---- whole-model gradient checks -------------------------------------------------------------------------

using Sequence = test::TokenSequence;
using test::random_sequence;

// Checks `per_tensor` random entries of every tensor (all 91 of them: embedding, every block's
// parameters, ln_out, head) against fourth-order central differences of model.objective (fp64). Criterion per entry:
// |analytic - numeric| / max(|analytic|, |numeric|, 1e-5) ≤ 1e-5 (measured worst 1.5e-6).
// Step of the difference quotients: the model has kinks (relu² in the channel mixes, the argmax of L2Wrap)
// where the fourth-order stencil's error grows like h when a perturbation straddles one; measured worst
// error 4.5e-6 at h = 1e-4 and 1.5e-6 at h = 3e-5 (then rounding dominates).
constexpr double kModelH = 3e-5;
void check_model_gradients(TrainModelT<double>& m, const Sequence& s, const double* weights, const LossOptions& opt,
                           int per_tensor) {
  const int64_t T = int64_t(s.ids.size());
  test::GradCheckResult res;
  for (size_t i = 0; i < m.n_params(); ++i) {
    const std::vector<double> analytic = m.grad(i);
    test::grad_check(m.param(i).name, m.value(i), analytic,
                     [&] { return m.objective(s.ids.data(), s.targets.data(), weights, T, opt); }, res, per_tensor,
                     1e-5, kModelH);
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", res.worst);
  testing::Test::RecordProperty("worst_rel_err", buf);
  testing::Test::RecordProperty("worst_at", res.where);
  testing::Test::RecordProperty("entries_checked", res.checked);
  EXPECT_GE(res.checked, int(m.n_params()) * per_tensor);
  EXPECT_LE(res.worst, 1e-5) << res.where;
}

TEST(GradModel, CrossEntropyWithL2WrapAndPadding) {
  TrainModelT<double> m = test::tiny_train_model<double>(3);
  Sequence s = random_sequence(14, 24, 4);
  s.targets[5] = -100;  // an unscored position
  LossOptions opt;
  opt.pad_multiple = 8;  // 2 pad tokens in front, as the official trainer pads to 16 with token 261
  opt.pad_id = 23;
  opt.batch_size = 2;
  // The sparse blocks really select: with every chunk allowed (dense causal attention) the loss differs.
  TrainModelT<double> dense = test::tiny_train_model<double>(3);
  dense.config().sparse.top_k = 100;
  EXPECT_GT(std::fabs(dense.objective(s.ids.data(), s.targets.data(), nullptr, 14, opt) -
                      m.objective(s.ids.data(), s.targets.data(), nullptr, 14, opt)),
            1e-6);
  m.zero_grad();
  const LossReport rep = m.forward_backward(s.ids.data(), s.targets.data(), 14, opt);
  EXPECT_EQ(rep.n_scored, 13);
  EXPECT_GT(rep.loss, 0.5);
  // The L2Wrap part is in the gradient: without it the gradient differs.
  TrainModelT<double> m2 = test::tiny_train_model<double>(3);
  LossOptions no_l2 = opt;
  no_l2.l2wrap = false;
  m2.zero_grad();
  m2.forward_backward(s.ids.data(), s.targets.data(), 14, no_l2);
  EXPECT_NE(m.grad(m.index("rwkv.head.weight")), m2.grad(m2.index("rwkv.head.weight")));
  check_model_gradients(m, s, nullptr, opt, 2);
}

TEST(GradModel, LongCeWithL2Wrap) {
  TrainModelT<double> m = test::tiny_train_model<double>(5);
  const Sequence s = random_sequence(16, 24, 6);
  LossOptions opt;
  opt.kind = LossKind::longce;
  // Windows: s = 4 scores 8..11, s = 8 scores 12..15 (short forwards of 8 tokens, 4 of context).
  opt.longce = LongCeParams{4, 4, 1.1};
  const std::vector<double> w = m.longce_weights(s.ids.data(), s.targets.data(), 16, opt);
  int capped = 0, reweighted = 0;
  for (int64_t t = 0; t < 16; ++t) {
    if (t < 8) {
      EXPECT_EQ(w[size_t(t)], 1.0) << t;
    }
    capped += w[size_t(t)] == 1.1;
    reweighted += t >= 8 && w[size_t(t)] != 1.0 && w[size_t(t)] < 1.1;
  }
  EXPECT_GT(capped, 0);
  EXPECT_GT(reweighted, 0);
  // forward_backward computes the same weights internally (ℓ_full from its own forward).
  m.zero_grad();
  const LossReport a = m.forward_backward(s.ids.data(), s.targets.data(), 16, opt);
  std::vector<std::vector<double>> internal;
  for (size_t i = 0; i < m.n_params(); ++i) internal.push_back(m.grad(i));
  m.zero_grad();
  const LossReport b = m.forward_backward_weighted(s.ids.data(), s.targets.data(), w.data(), 16, opt);
  EXPECT_EQ(a.loss, b.loss);
  for (size_t i = 0; i < m.n_params(); ++i) ASSERT_EQ(internal[i], m.grad(i)) << m.param(i).name;
  // The weights are constants (detached): the gradient is that of Σ w ℓ / T + L2Wrap penalty.
  // One entry per tensor: everything but the per-position weights is shared with the CE check above.
  check_model_gradients(m, s, w.data(), opt, 1);
}

// Plain RWKV-7 names (no "rwkv." prefix, no sparse blocks), SFT-style reduction over labelled positions.
TEST(GradModel, PlainRwkv7MaskedMean) {
  RandomModelSpec spec;
  spec.n_vocab = 24, spec.n_embd = 32, spec.head_size = 16, spec.n_rwkv = 3, spec.n_sparse = 0;
  spec.dim_w = spec.dim_a = spec.dim_v = spec.dim_g = 8;
  spec.seed = 12;
  TrainModelT<double> m = TrainModelT<double>::random(spec, ModelOptions{});
  m.wkv_save_every = 4;
  ASSERT_EQ(m.config().prefix, "");
  Sequence s = random_sequence(10, 24, 13);
  s.targets[0] = s.targets[1] = s.targets[6] = -100;
  LossOptions opt;
  opt.reduction = LossReduction::mean_valid;
  m.zero_grad();
  EXPECT_EQ(m.forward_backward(s.ids.data(), s.targets.data(), 10, opt).n_scored, 7);
  check_model_gradients(m, s, nullptr, opt, 1);
}

// Recomputation (keep only block inputs) and the WKV snapshot interval change nothing, bit for bit.
TEST(GradModel, RecomputeAndSnapshotsGiveIdenticalGradients) {
  const Sequence s = random_sequence(26, 24, 8);
  std::vector<std::vector<float>> ref;
  for (int variant = 0; variant < 3; ++variant) {
    TrainModel m = test::tiny_train_model<float>(7);
    m.recompute = variant >= 1;
    m.wkv_save_every = variant == 2 ? 1 : 16;
    m.zero_grad();
    m.forward_backward(s.ids.data(), s.targets.data(), 26, LossOptions{});
    for (size_t i = 0; i < m.n_params(); ++i) {
      if (variant == 0) ref.push_back(m.grad(i));
      else ASSERT_EQ(ref[i], m.grad(i)) << "variant " << variant << " " << m.param(i).name;
    }
  }
}

// The float gradients used for training agree with the fp64 ones: max |Δ| / max |g64| per tensor ≤ 1e-3
// (float rounding through 4 blocks; measured ~1e-5).
TEST(GradModel, FloatGradientsMatchDouble) {
  const Sequence s = random_sequence(22, 24, 10);
  TrainModel mf = test::tiny_train_model<float>(9);
  TrainModelT<double> md = test::tiny_train_model<double>(9);
  mf.zero_grad(), md.zero_grad();
  mf.forward_backward(s.ids.data(), s.targets.data(), 22, LossOptions{});
  md.forward_backward(s.ids.data(), s.targets.data(), 22, LossOptions{});
  double worst = 0;
  for (size_t i = 0; i < mf.n_params(); ++i) {
    const double e = test::rel_max_err(mf.grad(i), md.grad(i));
    EXPECT_LE(e, 1e-3) << mf.param(i).name;
    worst = std::max(worst, e);
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", worst);
  RecordProperty("worst_rel_err", buf);
}

// Parameters written to .safetensors load back bit-identical, and the inference engine accepts the file.
TEST(TrainModelIo, SafetensorsRoundTrip) {
  TrainModel m = test::tiny_train_model<float>(11);
  m.value("moba.1.att.key.weight")[3] = 0.125f;
  const std::string path = (std::filesystem::temp_directory_path() / "rwkvx_train_roundtrip.safetensors").string();
  m.save_safetensors(path, DType::f32);
  ModelOptions o;
  o.chunk = 4;
  TrainModel back = TrainModel::load(path, o);
  ASSERT_EQ(back.n_params(), m.n_params());
  for (size_t i = 0; i < m.n_params(); ++i) {
    EXPECT_EQ(back.param(i).name, m.param(i).name);
    EXPECT_EQ(back.param(i).shape, m.param(i).shape);
    EXPECT_EQ(back.value(i), m.value(i)) << m.param(i).name;
  }
  auto be = make_reference_backend();
  EXPECT_NO_THROW(Model::load(path, o, *be));
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace rwkvx::train
