// Whole models through the CUDA backend: the golden cases of the official implementation (weights as
// stored, bf16, which the GPU keeps bf16 and multiplies with bf16-rounded activations: ≤ 2e-3 of max|logit|;
// and the same weights widened to fp32, which take the fp32 GEMM path: ≤ 1e-4), decode = prefill, a split
// prefill = the whole, and batched sequences in permuted slots = separate runs. Without a GPU every test
// skips and says so.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "backend/cuda/cuda_backend.h"
#include "model/formats/tensor_store.h"
#include "support/random_model.h"

namespace rwkvx {
namespace {

std::unique_ptr<Backend> gpu_or_skip(std::string* why, bool bf16_attention = false) {
  if (!cuda_device_available(why)) return nullptr;
  CudaBackendOptions o;
  o.single_bf16_attention = bf16_attention;
  o.poison_uninit = true;  // an op that leaves part of an alloc_uninit output unwritten turns the logits NaN
  return make_cuda_backend(o);
}

#define REQUIRE_GPU(be, ...)                                                              \
  std::string why_;                                                                       \
  auto be = gpu_or_skip(&why_ __VA_OPT__(, ) __VA_ARGS__);                                \
  if (!be) GTEST_SKIP() << "no CUDA device (" << why_ << "): CUDA model tests skipped"

// The store with every tensor widened to fp32 (exact), so the GPU takes its fp32 paths.
TensorStore widened(const TensorStore& s) {
  TensorStore out = s;
  for (auto& [name, t] : out.tensors) {
    if (t.dtype == DType::f32) continue;
    auto buf = std::make_shared<std::vector<float>>(t.to_f32());
    t.dtype = DType::f32;
    t.data = reinterpret_cast<const uint8_t*>(buf->data());
    t.owner = buf;
  }
  return out;
}

struct GoldenParam {
  // weights: stored (bf16) | f32 | stored+bf16-attention (single_bf16_attention: the attention tiles round
  // their operands once, as cuDNN does; the bf16-weight tolerance applies)
  std::string name, format, mode, weights;
};

class CudaGolden : public testing::TestWithParam<GoldenParam> {};

TEST_P(CudaGolden, LogitsAndStatesMatch) {
  const GoldenParam& p = GetParam();
  REQUIRE_GPU(be, p.weights == "stored+bf16-attention");
  const std::string dir = test::golden_dir(p.name);
  nlohmann::json cas = nlohmann::json::parse(std::ifstream(dir + "/case.json"));
  std::vector<int32_t> ids = cas["tokens"].get<std::vector<int32_t>>();
  ModelOptions opt;
  opt.chunk = cas["config"]["chunk"].get<int>();
  opt.top_k = cas["config"]["topk"].get<int>();
  TensorStore store = load_checkpoint(dir + "/model." + p.format);
  if (p.weights == "f32") store = widened(store);
  auto model = Model::from_store(store, opt, *be);
  const ModelConfig& c = model->config();
  State st = model->new_state();
  const int64_t T = int64_t(ids.size()), V = c.n_vocab;
  std::vector<float> got(size_t(T * V));
  if (p.mode == "prefill") {
    Tensor l = model->forward(ids.data(), SeqBatch::single(T), st, LogitsMode::all);
    be->to_host(l, got.data());
  } else {
    for (int64_t t = 0; t < T; ++t) {
      Tensor l = model->forward(ids.data() + t, SeqBatch::single(1), st, LogitsMode::all);
      be->to_host(l, got.data() + t * V);
    }
  }
  const std::vector<float> ref = test::read_f32_file(dir + "/logits.f32");
  ASSERT_EQ(ref.size(), got.size());
  const double err = test::rel_max_err(got, ref);
  RecordProperty("rel_max_err", std::to_string(err));
  std::printf("[golden] %s %s %s %s weights: rel_max_err %.3g\n", p.name.c_str(), p.format.c_str(), p.mode.c_str(),
              p.weights.c_str(), err);
  const bool f32 = p.weights == "f32";
  EXPECT_LE(err, f32 ? 1e-4 : 2e-3);
  for (int64_t i = 0; i < c.n_rwkv; ++i) {
    const std::string f = dir + "/wkv_state_layer" + std::to_string(i) + ".f32";
    if (!std::filesystem::exists(f)) continue;
    const std::vector<float> ref_state = test::read_f32_file(f);
    std::vector<float> s(size_t(st.wkv[size_t(i)].numel()));
    be->to_host(st.wkv[size_t(i)], s.data());
    EXPECT_LE(test::rel_max_err(s, ref_state), f32 ? 1e-4 : 1e-2) << "wkv state of layer " << i;
  }
}

std::vector<GoldenParam> golden_cases() {
  std::vector<GoldenParam> v;
  for (const char* n : {"rwkv7-tiny", "rwkvx-tiny"})
    for (const char* f : {"pth", "safetensors"})
      for (const char* m : {"prefill", "decode"})
        for (const char* w : {"stored", "f32", "stored+bf16-attention"}) v.push_back({n, f, m, w});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Golden, CudaGolden, testing::ValuesIn(golden_cases()), [](const auto& i) {
  std::string s = i.param.name + "_" + i.param.format + "_" + i.param.mode + "_" + i.param.weights;
  for (char& ch : s)
    if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return s;
});

struct InvCase {
  const char* label;
  RandomModelSpec spec;
  int chunk, top_k;
  int64_t T;
};

std::vector<InvCase> inv_cases() {
  std::vector<InvCase> v;
  RandomModelSpec s;
  s = {}; s.n_embd = 128; s.n_rwkv = 4; s.n_sparse = 2; s.seed = 12;
  v.push_back({"rwkvx_C128_c8_k3", s, 8, 3, 150});
  s = {}; s.n_embd = 256; s.n_rwkv = 2; s.n_sparse = 2; s.dtype = DType::bf16; s.seed = 14;
  v.push_back({"rwkvx_C256_bf16_c70_k4", s, 70, 4, 300});
  s = {}; s.n_embd = 192; s.n_rwkv = 2; s.n_sparse = 1; s.seed = 13;
  v.push_back({"rwkvx_C192_c5_k2", s, 5, 2, 97});
  return v;
}

class CudaInvariant : public testing::TestWithParam<InvCase> {};

// The GPU takes different kernels for one token (decode attention, GEMV-shaped GEMMs) and many (chunk-
// bucketed attention, tiled GEMMs): equal to fp32 rounding with fp32 weights; with bf16 weights the
// activations are rounded to bf16 in both, so they agree closely too.
double inv_tol(const InvCase& c) { return c.spec.dtype == DType::bf16 ? 2e-4 : 2e-5; }

TEST_P(CudaInvariant, DecodeEqualsPrefill) {
  REQUIRE_GPU(be);
  const InvCase& c = GetParam();
  ModelOptions opt;
  opt.chunk = c.chunk, opt.top_k = c.top_k;
  auto m = test::load_random_model(c.spec, opt, *be);
  const std::vector<int32_t> ids = test::random_tokens(c.T, c.spec.n_vocab, c.spec.seed * 7);
  State whole = m->new_state(), steps = m->new_state();
  std::vector<float> a = test::run_pieces(*m, whole, ids, {c.T});
  std::vector<float> b = test::run_pieces(*m, steps, ids, std::vector<int64_t>(size_t(c.T), 1));
  EXPECT_LE(test::rel_max_err(b, a), inv_tol(c));
  EXPECT_LE(test::state_diff(*be, steps, whole), inv_tol(c));
}

TEST_P(CudaInvariant, SplitPrefillEqualsWhole) {
  REQUIRE_GPU(be);
  const InvCase& c = GetParam();
  ModelOptions opt;
  opt.chunk = c.chunk, opt.top_k = c.top_k;
  auto m = test::load_random_model(c.spec, opt, *be);
  const std::vector<int32_t> ids = test::random_tokens(c.T, c.spec.n_vocab, c.spec.seed * 3);
  State whole = m->new_state(), split = m->new_state();
  std::vector<float> a = test::run_pieces(*m, whole, ids, {c.T});
  const int64_t p1 = c.T / 3, p2 = 1, p3 = c.chunk * 2 < c.T - p1 - p2 ? c.chunk * 2 : 1;
  std::vector<float> b = test::run_pieces(*m, split, ids, {p1, p2, p3, c.T - p1 - p2 - p3});
  EXPECT_LE(test::rel_max_err(b, a), inv_tol(c));
  EXPECT_LE(test::state_diff(*be, split, whole), inv_tol(c));
}

TEST_P(CudaInvariant, MatchesCpuReference) {
  REQUIRE_GPU(be);
  const InvCase& c = GetParam();
  if (c.spec.dtype == DType::bf16) GTEST_SKIP() << "bf16 weights round activations on the GPU; golden tests bound that";
  ModelOptions opt;
  opt.chunk = c.chunk, opt.top_k = c.top_k;
  auto ref = make_reference_backend();
  auto m = test::load_random_model(c.spec, opt, *be);
  auto mr = test::load_random_model(c.spec, opt, *ref);
  const std::vector<int32_t> ids = test::random_tokens(c.T, c.spec.n_vocab, c.spec.seed * 5);
  State sg = m->new_state(), sr = mr->new_state();
  std::vector<float> a = test::run_pieces(*m, sg, ids, {c.T});
  std::vector<float> b = test::run_pieces(*mr, sr, ids, {c.T});
  EXPECT_LE(test::rel_max_err(a, b), 1e-4);
}

// Two sequences in one call, in permuted slots, equal separate runs; then one batched decode step.
TEST_P(CudaInvariant, BatchedSequencesEqualSeparateRuns) {
  REQUIRE_GPU(be);
  const InvCase& c = GetParam();
  ModelOptions opt;
  opt.chunk = c.chunk, opt.top_k = c.top_k;
  auto m = test::load_random_model(c.spec, opt, *be);
  const int64_t V = m->config().n_vocab, n1 = c.T / 2, n2 = c.T - 7;
  const std::vector<int32_t> a = test::random_tokens(n1 + 1, c.spec.n_vocab, 101);
  const std::vector<int32_t> b = test::random_tokens(n2 + 1, c.spec.n_vocab, 202);
  State sa = m->new_state(), sb = m->new_state();
  std::vector<float> la = test::run_pieces(*m, sa, a, {n1, 1});
  std::vector<float> lb = test::run_pieces(*m, sb, b, {n2, 1});
  State s = m->new_state(3);
  std::vector<int32_t> ids(a.begin(), a.begin() + n1);
  ids.insert(ids.end(), b.begin(), b.begin() + n2);
  Tensor l = m->forward(ids.data(), SeqBatch{{0, n1, n1 + n2}, {2, 0}}, s, LogitsMode::all);
  std::vector<float> got = test::host(*be, l);
  std::vector<float> want(la.begin(), la.begin() + n1 * V);
  want.insert(want.end(), lb.begin(), lb.begin() + n2 * V);
  EXPECT_LE(test::rel_max_err(got, want), inv_tol(c));
  const int32_t step[2] = {b[size_t(n2)], a[size_t(n1)]};
  Tensor l2 = m->forward(step, SeqBatch{{0, 1, 2}, {0, 2}}, s, LogitsMode::last);
  std::vector<float> got2 = test::host(*be, l2);
  std::vector<float> want2(lb.end() - V, lb.end());
  want2.insert(want2.end(), la.end() - V, la.end());
  EXPECT_LE(test::rel_max_err(got2, want2), inv_tol(c));
}

INSTANTIATE_TEST_SUITE_P(Random, CudaInvariant, testing::ValuesIn(inv_cases()),
                         [](const auto& i) { return std::string(i.param.label); });

TEST(CudaBackendInfo, ReportsDeviceOrSkips) {
  std::string why;
  if (!cuda_device_available(&why)) GTEST_SKIP() << "no CUDA device (" << why << ")";
  auto be = make_cuda_backend();
  std::printf("[device] %s\n", be->name().c_str());
  EXPECT_EQ(be->name().rfind("cuda:", 0), 0u);
}

}  // namespace
}  // namespace rwkvx
