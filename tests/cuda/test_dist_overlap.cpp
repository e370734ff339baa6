// The data-parallel gradient reduction overlapped with the backward, on one GPU: CudaTrainModel's
// gradient-ready hook reports every trainable tensor once (head first, embedding last) with gradients that
// are already final and changes nothing, and DistAdamW over a one-rank NCCL world gives bit for bit the
// same norms and weights with the overlap (several bucket sizes) as without it, and as CudaAdamW. Without
// a GPU, or without a loadable NCCL (libnccl.so.2 on the library path, or RWKVX_NCCL_LIBRARY), every test
// skips and says so.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "core/error.h"
#include "support/tiny_train_model.h"
#include "train/cuda/cuda_train_model.h"
#include "train/dist/cuda/dist_adamw.h"
#include "train/dist/cuda/nccl_comm.h"
#include "train/train_model.h"

namespace rwkvx::train {
namespace {

class TrainCudaDist : public testing::Test {
 public:
  void SetUp() override {
    std::string why;
    if (!cuda_device_available(&why)) GTEST_SKIP() << "no CUDA device (" << why << "): CUDA training tests skipped";
  }
};

// A world of one rank (the data-parallel path with RWKVX_DIST_FORCE=1), or null with the reason when NCCL
// cannot be loaded.
std::unique_ptr<dist::Communicator> one_rank(std::string* why) {
  dist::DistEnv env;
  env.force = true;
  env.init = (std::filesystem::temp_directory_path() /
              ("rwkvx_test_dist_overlap_" + std::to_string(::getpid()) + ".rdv"))
                 .string();
  try {
    return std::make_unique<dist::Communicator>(env);
  } catch (const Error& e) {
    *why = e.what();
    return nullptr;
  }
}

std::vector<int32_t> random_tokens(int64_t n, int64_t V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t& x : t) x = int32_t(rng() % uint64_t(V));
  return t;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// Reports of the hook: the groups, and each reported tensor's gradient at the time it was reported.
struct HookLog {
  std::vector<std::vector<size_t>> groups;
  std::vector<std::pair<size_t, std::vector<float>>> at_report;
};

void check_hook(TrainModel host, bool recompute) {
  host.recompute = recompute;
  const int64_t T = 23, V = host.config().n_vocab;
  const std::vector<int32_t> a = random_tokens(T + 1, V, 11), b = random_tokens(T + 1, V, 12);
  LossOptions lo;
  lo.batch_size = 2;
  lo.pad_multiple = 8;
  lo.pad_id = 23;
  CudaTrainModel plain(host, CudaTrainOptions{}), hooked(host, CudaTrainOptions{});
  HookLog log;
  for (CudaTrainModel* m : {&plain, &hooked}) {
    m->zero_grad();
    m->forward_backward(a.data(), a.data() + 1, T, lo);
    if (m == &hooked)
      m->set_grad_ready_hook([&](const std::vector<size_t>& idx) {
        log.groups.push_back(idx);
        for (size_t i : idx) log.at_report.emplace_back(i, m->grad(i));  // grad() waits for the stream
      });
    m->forward_backward(b.data(), b.data() + 1, T, lo);
  }
  hooked.set_grad_ready_hook(nullptr);
  // Every trainable tensor once, nothing else; the head first, the embedding last.
  std::multiset<size_t> seen;
  for (const auto& g : log.groups) {
    EXPECT_FALSE(g.empty());
    seen.insert(g.begin(), g.end());
  }
  for (size_t i = 0; i < host.n_params(); ++i)
    EXPECT_EQ(seen.count(i), host.param(i).trainable ? 1u : 0u) << host.param(i).name;
  ASSERT_GE(log.groups.size(), 2u);
  const std::string& prefix = host.config().prefix;
  auto holds = [&](const std::vector<size_t>& g, const std::string& name) {
    for (size_t i : g)
      if (host.param(i).name == name) return true;
    return false;
  };
  bool head_trainable = false, emb_trainable = false;
  for (size_t i = 0; i < host.n_params(); ++i) {
    head_trainable |= host.param(i).name == prefix + "head.weight" && host.param(i).trainable;
    emb_trainable |= host.param(i).name == prefix + "emb.weight" && host.param(i).trainable;
  }
  if (head_trainable) {
    EXPECT_TRUE(holds(log.groups.front(), prefix + "head.weight"));
  }
  if (emb_trainable) {
    EXPECT_TRUE(holds(log.groups.back(), prefix + "emb.weight"));
  }
  // Final when reported, and the hook changed nothing.
  for (const auto& [i, g] : log.at_report) EXPECT_TRUE(same_bits(g, hooked.grad(i))) << host.param(i).name;
  for (size_t i = 0; i < host.n_params(); ++i)
    if (host.param(i).trainable) {
      EXPECT_TRUE(same_bits(hooked.grad(i), plain.grad(i))) << host.param(i).name;
    }
}

TEST_F(TrainCudaDist, HookReportsEachTrainableTensorOnceWithFinalGradients) {
  check_hook(test::tiny_train_model<float>(5), false);
  check_hook(test::tiny_train_model<float>(5), true);
  TrainModel frozen = test::tiny_train_model<float>(6);
  frozen.freeze_all_but_sparse();  // stage 1: only the sparse blocks train
  check_hook(std::move(frozen), false);
}

// K steps of 2 sequences each (the second armed for the overlap), with CudaAdamW (overlap == nullptr) or
// DistAdamW over `comm`; the norms and the final weights.
struct Trajectory {
  std::vector<double> norms;
  std::vector<std::vector<float>> weights;
};
Trajectory train(const TrainModel& host, dist::Communicator* comm, const dist::OverlapOptions* overlap) {
  CudaTrainModel gpu(host, CudaTrainOptions{});
  AdamWOptions ao;
  ao.grad_clip = 0.5;  // clipped in some steps
  std::unique_ptr<CudaAdamW> single;
  std::unique_ptr<dist::DistAdamW> dp;
  if (comm) dp = std::make_unique<dist::DistAdamW>(gpu, ao, *comm, *overlap);
  else single = std::make_unique<CudaAdamW>(gpu, ao);
  LossOptions lo;
  lo.batch_size = 2;
  lo.pad_multiple = 16;
  const int64_t T = 70, V = host.config().n_vocab;
  Trajectory tr;
  for (int step = 0; step < 3; ++step) {
    gpu.zero_grad();
    for (int s = 0; s < 2; ++s) {
      const std::vector<int32_t> t = random_tokens(T + 1, V, uint64_t(100 + 2 * step + s));
      if (dp && s == 1) dp->overlap_next_backward();
      gpu.forward_backward(t.data(), t.data() + 1, T, lo);
    }
    tr.norms.push_back(dp ? dp->step(2e-3, 1e-3) : single->step(2e-3, 1e-3));
  }
  for (size_t i = 0; i < gpu.n_params(); ++i) tr.weights.push_back(gpu.value(i));
  return tr;
}

TEST_F(TrainCudaDist, OverlapGivesBitwiseTheSameWeights) {
  std::string why;
  std::unique_ptr<dist::Communicator> comm = one_rank(&why);
  if (!comm) GTEST_SKIP() << "NCCL not usable (" << why << "): data-parallel tests skipped";
  const TrainModel host = test::small_train_model(21);
  const dist::OverlapOptions off{false, int64_t(25) << 20};
  const Trajectory ref = train(host, comm.get(), &off);
  const Trajectory single = train(host, nullptr, nullptr);
  for (const dist::OverlapOptions& ov :
       {dist::OverlapOptions{true, 0}, dist::OverlapOptions{true, int64_t(64) << 10},
        dist::OverlapOptions{true, int64_t(25) << 20}, dist::OverlapOptions{true, int64_t(1) << 30}}) {
    const Trajectory t = train(host, comm.get(), &ov);
    const std::string what = "bucket of " + std::to_string(ov.bucket_bytes) + " bytes";
    EXPECT_EQ(t.norms, ref.norms) << what;
    for (size_t i = 0; i < host.n_params(); ++i)
      EXPECT_TRUE(same_bits(t.weights[i], ref.weights[i])) << what << ": " << host.param(i).name;
  }
  // One rank of DistAdamW is CudaAdamW: the same norm (the per-tensor Σg² in tensor order) and update.
  EXPECT_EQ(single.norms, ref.norms);
  for (size_t i = 0; i < host.n_params(); ++i)
    EXPECT_TRUE(same_bits(single.weights[i], ref.weights[i])) << "CudaAdamW: " << host.param(i).name;
  // The weights moved (the comparison is not vacuous) and the clip was active.
  EXPECT_FALSE(same_bits(ref.weights[0], host.value(0)));
  EXPECT_GT(ref.norms[0], 0.5);
}

TEST_F(TrainCudaDist, ArmingTwiceInOneStepIsRefused) {
  std::string why;
  std::unique_ptr<dist::Communicator> comm = one_rank(&why);
  if (!comm) GTEST_SKIP() << "NCCL not usable (" << why << "): data-parallel tests skipped";
  const TrainModel host = test::tiny_train_model<float>(7);
  CudaTrainModel gpu(host, CudaTrainOptions{});
  dist::DistAdamW opt(gpu, AdamWOptions{}, *comm, dist::OverlapOptions{true, 0});
  LossOptions lo;
  const int64_t T = 9;
  const std::vector<int32_t> t = random_tokens(T + 1, host.config().n_vocab, 3);
  gpu.zero_grad();
  opt.overlap_next_backward();
  gpu.forward_backward(t.data(), t.data() + 1, T, lo);
  // Still armed: a second backward in the same step would hand its tensors over twice.
  EXPECT_THROW(gpu.forward_backward(t.data(), t.data() + 1, T, lo), Error);
  opt.step(1e-3, 0);  // disarms; the step completes
  gpu.zero_grad();
  gpu.forward_backward(t.data(), t.data() + 1, T, lo);  // not armed: nothing handed over
  opt.overlap_next_backward();
  gpu.forward_backward(t.data(), t.data() + 1, T, lo);
  const double norm = opt.step(1e-3, 0);
  EXPECT_TRUE(std::isfinite(norm));
  EXPECT_GT(norm, 0);
}

}  // namespace
}  // namespace rwkvx::train
