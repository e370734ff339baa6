// Golden cases from the official implementation (../shared/golden): logits of every position in
// prefill and token-by-token decode, loaded from .pth and .safetensors, and final WKV states.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_backend.h"
#include "model/model.h"
#include "support/test_util.h"

namespace rwkvx {
namespace {

struct GoldenParam {
  std::string name, format, mode, backend;  // backend: reference | cpu | cpu-int8
};

std::unique_ptr<Backend> make_backend(const std::string& name) {
  if (name == "reference") return make_reference_backend();
  CpuBackendOptions o;
  o.quantize_int8 = name == "cpu-int8";
  return make_cpu_backend(o);
}

// Tolerances (max|Δ| / max|ref|). fp32 compute (fp32 or bf16 weights, which are exact in fp32) must
// meet the spec's 1e-4 bar with room to spare (measured 1e-6). int8 weights, one scale per output channel:
// measured 1.8e-2 on rwkv7-tiny and 1.7e-2 on rwkvx-tiny with dense attention, but 1.05e-1 on rwkvx-tiny
// with top-k 3, because the quantization error flips some top-k chunk choices (a discontinuity, §5.6).
double tolerance(const std::string& backend, const std::string& name) {
  if (backend != "cpu-int8") return 2e-5;
  return name == "rwkvx-tiny" ? 0.15 : 3e-2;
}

std::string param_name(const testing::TestParamInfo<GoldenParam>& i) {
  std::string s = i.param.name + "_" + i.param.format + "_" + i.param.mode + "_" + i.param.backend;
  for (char& c : s)
    if (!isalnum(static_cast<unsigned char>(c))) c = '_';
  return s;
}

class GoldenTest : public testing::TestWithParam<GoldenParam> {};

TEST_P(GoldenTest, LogitsAndStatesMatch) {
  const GoldenParam& p = GetParam();
  const std::string dir = test::golden_dir(p.name);
  nlohmann::json cas = nlohmann::json::parse(std::ifstream(dir + "/case.json"));
  std::vector<int32_t> ids = cas["tokens"].get<std::vector<int32_t>>();
  ModelOptions opt;
  opt.chunk = cas["config"]["chunk"].get<int>();
  opt.top_k = cas["config"]["topk"].get<int>();
  auto be = make_backend(p.backend);
  auto model = Model::load(dir + "/model." + p.format, opt, *be);
  const ModelConfig& c = model->config();
  EXPECT_EQ(c.n_embd, cas["config"]["n_embd"].get<int64_t>());
  EXPECT_EQ(c.n_rwkv, cas["config"]["n_rwkv"].get<int64_t>());
  EXPECT_EQ(c.n_sparse, cas["config"]["n_moba"].get<int64_t>());
  EXPECT_EQ(c.n_vocab, cas["config"]["vocab"].get<int64_t>());

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
  // A correct fp32 engine lands near 1e-6 (spec §8); the fp32 bar here is tighter than the spec's 1e-4.
  EXPECT_LE(err, tolerance(p.backend, p.name)) << p.name << " " << p.format << " " << p.mode << " " << p.backend;

  int n_states = 0;
  for (int64_t i = 0; i < c.n_rwkv; ++i) {
    const std::string f = dir + "/wkv_state_layer" + std::to_string(i) + ".f32";
    if (!std::filesystem::exists(f)) continue;
    ++n_states;
    const std::vector<float> ref_state = test::read_f32_file(f);
    std::vector<float> s(size_t(st.wkv[size_t(i)].numel()));
    be->to_host(st.wkv[size_t(i)], s.data());
    EXPECT_LE(test::rel_max_err(s, ref_state), p.backend == "cpu-int8" ? 0.15 : 1e-4) << "wkv state of layer " << i;
  }
  if (p.name == "rwkv7-tiny") {
    EXPECT_EQ(n_states, 2);
  }
}

std::vector<GoldenParam> all_cases() {
  std::vector<GoldenParam> v;
  for (const char* n : {"rwkv7-tiny", "rwkvx-tiny"})
    for (const char* f : {"pth", "safetensors"})
      for (const char* m : {"prefill", "decode"})
        for (const char* b : {"reference", "cpu", "cpu-int8"}) v.push_back({n, f, m, b});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Golden, GoldenTest, testing::ValuesIn(all_cases()), param_name);

}  // namespace
}  // namespace rwkvx
