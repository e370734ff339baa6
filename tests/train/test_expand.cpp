// RWKV-7 → RWKV-X expansion (spec system.md §3.2, §3.3): every RWKV-7 golden checkpoint, expanded with
// the paper's init into either format, reproduces the golden logits through the reference backend and
// loads as RWKV-X with the requested sparse blocks in the official places; `official` copies weights and
// changes the logits, deterministically; `random` is seeded; dtypes are kept; bad requests are refused.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/model.h"
#include "support/random_model.h"
#include "support/run_cli.h"
#include "support/test_util.h"
#include "train/expand.h"

namespace rwkvx {
namespace {

struct GoldenCase {
  std::vector<int32_t> tokens;
  ModelOptions opt;
  std::vector<float> logits;
};

GoldenCase golden(const std::string& name) {
  const std::string dir = test::golden_dir(name);
  nlohmann::json cas = nlohmann::json::parse(std::ifstream(dir + "/case.json"));
  GoldenCase g;
  g.tokens = cas["tokens"].get<std::vector<int32_t>>();
  g.opt.chunk = cas["config"]["chunk"].get<int>();
  g.opt.top_k = cas["config"]["topk"].get<int>();
  g.logits = test::read_f32_file(dir + "/logits.f32");
  return g;
}

std::vector<float> prefill_logits(const Model& m, const std::vector<int32_t>& ids) {
  State st = m.new_state();
  Tensor l = m.forward(ids.data(), SeqBatch::single(int64_t(ids.size())), st, LogitsMode::all);
  return test::host(m.backend(), l);
}

std::vector<float> logits_of_file(const std::string& path, const GoldenCase& g, int64_t expect_sparse) {
  auto be = make_reference_backend();
  auto m = Model::load(path, g.opt, *be);
  EXPECT_EQ(m->config().arch, ArchKind::rwkvx) << path;
  EXPECT_EQ(m->config().n_sparse, expect_sparse) << path;
  return prefill_logits(*m, g.tokens);
}

const TensorData& find(const std::vector<TensorData>& ts, const std::string& name) {
  for (const TensorData& t : ts)
    if (t.name == name) return t;
  throw Error("test: no tensor " + name);
}

std::vector<float> values(const TensorData& t) {
  std::vector<float> v(t.bytes.size() / dtype_size(t.dtype));
  convert_to_f32(t.dtype, t.bytes.data(), v.data(), v.size());
  return v;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = a.size() == b.size() ? 0 : INFINITY;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, double(std::fabs(a[i] - b[i])));
  return m;
}

// Every RWKV-7 golden case, both source formats, both output formats, every valid sparse count.
TEST(Expand, GoldenRwkv7ReproducesLogitsInEveryFormatAndLayout) {
  const GoldenCase g = golden("rwkv7-tiny");
  test::TempDir dir;
  for (const char* in_fmt : {"pth", "safetensors"}) {
    TensorStore src = load_checkpoint(test::golden_dir("rwkv7-tiny") + "/model." + in_fmt);
    for (int64_t n_sparse : {1, 2, 4}) {
      ExpandOptions opt;
      opt.n_sparse = n_sparse;
      ExpandResult r = expand_rwkv7(src, opt);
      EXPECT_EQ(r.n_sparse, n_sparse);
      for (const char* out_fmt : {"pth", "safetensors"}) {
        const std::string out = dir.file(std::string("x_") + in_fmt + "_" + std::to_string(n_sparse) + "." + out_fmt);
        save_checkpoint(out, r.tensors);
        const std::vector<float> got = logits_of_file(out, g, n_sparse);
        const double err = test::rel_max_err(got, g.logits);
        EXPECT_LE(err, 1e-5) << in_fmt << " -> " << out_fmt << ", " << n_sparse << " sparse blocks";

        auto be = make_reference_backend();
        auto m = Model::load(out, g.opt, *be);
        // Official placement (§3.2): sparse block j right after RWKV block (j+1)·(4/n) − 1.
        std::string order;
        const int64_t r_int = 4 / n_sparse;
        for (int64_t i = 0, j = 0; i < 4; ++i) {
          order += (order.empty() ? "R" : " R") + std::to_string(i);
          if ((i + 1) % r_int == 0) order += " M" + std::to_string(j++);
        }
        EXPECT_EQ(m->config().block_order_str(), order);
      }
    }
  }
}

// The zeroed projections make the sparse blocks add exactly 0: bitwise equal to the source model.
TEST(Expand, PaperInitIsBitwiseIdentityOnBf16AndF32Sources) {
  test::TempDir dir;
  for (DType dt : {DType::f32, DType::bf16}) {
    RandomModelSpec spec = find_preset("rwkv7-tiny");
    spec.n_rwkv = 6;
    spec.dtype = dt;
    spec.seed = 7;
    auto file = MappedFile::from_bytes("src.safetensors", serialize_safetensors(make_random_model(spec)));
    TensorStore src = parse_safetensors(file);
    ExpandOptions opt;
    opt.n_sparse = 3;
    ExpandResult r = expand_rwkv7(src, opt);
    for (const TensorData& t : r.tensors) EXPECT_EQ(t.dtype, dt) << t.name << " keeps the source dtype";
    const std::string out = dir.file(std::string("x_") + std::string(dtype_name(dt)) + ".pth");
    save_checkpoint(out, r.tensors);

    ModelOptions mo;
    mo.chunk = 8;
    auto be = make_reference_backend();
    auto src_model = Model::from_store(src, mo, *be);
    auto x_model = Model::load(out, mo, *be);
    EXPECT_EQ(x_model->config().n_sparse, 3);
    EXPECT_EQ(x_model->config().block_order_str(), "R0 R1 M0 R2 R3 M1 R4 R5 M2");
    const std::vector<int32_t> ids = test::random_tokens(40, spec.n_vocab, 3);
    EXPECT_EQ(max_abs_diff(prefill_logits(*x_model, ids), prefill_logits(*src_model, ids)), 0.0)
        << dtype_name(dt);
  }
}

TEST(Expand, InitialisationFollowsTheSpec) {
  TensorStore src = load_checkpoint(test::golden_dir("rwkv7-tiny") + "/model.safetensors");
  const int64_t C = 128;
  for (ExpandInit init : {ExpandInit::paper, ExpandInit::official, ExpandInit::random}) {
    ExpandOptions opt;
    opt.n_sparse = 2;
    opt.init = init;
    ExpandResult r = expand_rwkv7(src, opt);
    EXPECT_EQ(r.positions, (std::vector<int64_t>{1, 3}));
    // Every RWKV tensor is the source's, renamed.
    for (const auto& [name, t] : src.tensors) {
      const TensorData& e = find(r.tensors, "rwkv." + name);
      EXPECT_EQ(e.shape, t.shape);
      ASSERT_EQ(e.bytes.size(), t.nbytes());
      EXPECT_EQ(std::memcmp(e.bytes.data(), t.data, t.nbytes()), 0) << name;
    }
    for (int j = 0; j < 2; ++j) {
      const std::string m = "moba." + std::to_string(j) + ".", s = "blocks." + std::to_string(r.positions[j]) + ".";
      for (float v : values(find(r.tensors, m + "ln1.weight"))) EXPECT_EQ(v, 1.0f);
      for (float v : values(find(r.tensors, m + "ln2.bias"))) EXPECT_EQ(v, 0.0f);
      const std::vector<float> xk = values(find(r.tensors, m + "ffn.x_k"));
      EXPECT_EQ(find(r.tensors, m + "ffn.x_k").shape, src.get(s + "ffn.x_k").shape);
      const double expo = std::pow(1.0 - j / 4.0, 4.0);
      for (int64_t c = 0; c < C; ++c) EXPECT_NEAR(xk[size_t(c)], 1.0 - std::pow(double(c) / C, expo), 1e-6);
      auto same_as_source = [&](const std::string& mn, const std::string& sn) {
        return values(find(r.tensors, m + mn)) == src.get(s + sn).to_f32();
      };
      auto all_zero = [&](const std::string& mn) {
        for (float v : values(find(r.tensors, m + mn)))
          if (v != 0.0f) return false;
        return true;
      };
      if (init == ExpandInit::random) {
        const double a_rv = 0.5 / std::sqrt(double(C)), a_k = 0.05 / std::sqrt(double(C));
        for (float v : values(find(r.tensors, m + "att.receptance.weight"))) EXPECT_LE(std::fabs(v), a_rv);
        for (float v : values(find(r.tensors, m + "att.key.weight"))) EXPECT_LE(std::fabs(v), a_k);
        EXPECT_FALSE(same_as_source("att.value.weight", "att.value.weight"));
        EXPECT_TRUE(all_zero("att.output.weight"));
        EXPECT_TRUE(all_zero("ffn.value.weight"));
        continue;
      }
      for (const char* w : {"att.receptance.weight", "att.key.weight", "att.value.weight", "ffn.key.weight"})
        EXPECT_TRUE(same_as_source(w, w)) << m << w;
      if (init == ExpandInit::official) {
        EXPECT_TRUE(same_as_source("att.output.weight", "att.output.weight"));
        EXPECT_TRUE(same_as_source("ffn.value.weight", "ffn.value.weight"));
      } else {
        EXPECT_TRUE(all_zero("att.output.weight"));
        EXPECT_TRUE(all_zero("ffn.value.weight"));
      }
    }
  }
}

TEST(Expand, OfficialDiffersAndInitsAreDeterministic) {
  const GoldenCase g = golden("rwkv7-tiny");
  TensorStore src = load_checkpoint(test::golden_dir("rwkv7-tiny") + "/model.pth");
  auto bytes = [&](ExpandInit init, uint64_t seed) {
    ExpandOptions opt;
    opt.n_sparse = 2;
    opt.init = init;
    opt.seed = seed;
    return serialize_safetensors(expand_rwkv7(src, opt).tensors);
  };
  // official: no random numbers, so every seed gives the same file.
  EXPECT_EQ(bytes(ExpandInit::official, 1), bytes(ExpandInit::official, 1));
  EXPECT_EQ(bytes(ExpandInit::official, 1), bytes(ExpandInit::official, 99));
  EXPECT_NE(bytes(ExpandInit::official, 1), bytes(ExpandInit::paper, 1));
  // random: one file per seed.
  EXPECT_EQ(bytes(ExpandInit::random, 5), bytes(ExpandInit::random, 5));
  EXPECT_NE(bytes(ExpandInit::random, 5), bytes(ExpandInit::random, 6));

  test::TempDir dir;
  auto logits = [&](ExpandInit init, uint64_t seed) {
    const std::string p = dir.file("m.safetensors");
    ExpandOptions opt;
    opt.n_sparse = 2;
    opt.init = init;
    opt.seed = seed;
    save_checkpoint(p, expand_rwkv7(src, opt).tensors);
    return logits_of_file(p, g, 2);
  };
  // The copied output projections change the function (spec §3.3 point 4); `random` keeps them zero.
  const double off_err = test::rel_max_err(logits(ExpandInit::official, 1), g.logits);
  RecordProperty("official_rel_err", std::to_string(off_err));
  EXPECT_GT(off_err, 1e-3);
  EXPECT_LE(test::rel_max_err(logits(ExpandInit::random, 3), g.logits), 1e-5);
}

TEST(Expand, LayoutRules) {
  EXPECT_EQ(sparse_block_positions(12, 4), (std::vector<int64_t>{2, 5, 8, 11}));
  EXPECT_EQ(sparse_block_positions(32, 8), (std::vector<int64_t>{3, 7, 11, 15, 19, 23, 27, 31}));
  EXPECT_EQ(sparse_block_positions(12, 1), (std::vector<int64_t>{11}));
  EXPECT_EQ(sparse_block_positions(5, 1), (std::vector<int64_t>{4}));
  EXPECT_EQ(default_sparse_count(12), 4);
  EXPECT_EQ(default_sparse_count(32), 8);
  EXPECT_EQ(default_sparse_count(24), 8);
  EXPECT_EQ(default_sparse_count(4), 1);
  EXPECT_THROW(default_sparse_count(5), Error);
  EXPECT_EQ(parse_sparse_layers("4", 12), 4);
  EXPECT_EQ(parse_sparse_layers("2,5,8,11", 12), 4);
  EXPECT_EQ(parse_sparse_layers(" 5 , 11 ", 12), 2);
  auto msg = [](const std::string& text, int64_t n) {
    try {
      parse_sparse_layers(text, n);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(msg("5", 12).find("does not divide"), std::string::npos) << msg("5", 12);
  EXPECT_NE(msg("0", 12).find("1..12"), std::string::npos) << msg("0", 12);
  EXPECT_NE(msg("13", 12).find("1..12"), std::string::npos);
  EXPECT_NE(msg("1,5", 12).find("after RWKV blocks 5,11"), std::string::npos) << msg("1,5", 12);
  EXPECT_NE(msg("2,5,8", 12).find("after RWKV blocks 3,7,11"), std::string::npos) << msg("2,5,8", 12);
  EXPECT_NE(msg("1,2,3,4,5", 12).find("5 does not divide 12"), std::string::npos) << msg("1,2,3,4,5", 12);
  EXPECT_NE(msg("four", 12).find("expected a count"), std::string::npos);
  EXPECT_NE(msg("", 12).find("expected a count"), std::string::npos);
  EXPECT_NE(msg("2,,5", 12).find("expected a count"), std::string::npos);
  EXPECT_NE(msg("-4", 12).find("expected a count"), std::string::npos);
  EXPECT_NE(msg("99999999999999", 12).find("expected a count"), std::string::npos);
  EXPECT_EQ(parse_expand_init("llamapro"), ExpandInit::paper);
  EXPECT_EQ(parse_expand_init("copy"), ExpandInit::official);
  EXPECT_THROW(parse_expand_init("zero"), Error);
}

TEST(Expand, RefusesBadSources) {
  // Already RWKV-X.
  TensorStore x = load_checkpoint(test::golden_dir("rwkvx-tiny") + "/model.safetensors");
  try {
    expand_rwkv7(x, {});
    FAIL() << "expanded an RWKV-X checkpoint";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("already an RWKV-X"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("model.safetensors"), std::string::npos) << e.what();
  }
  // A width that is not a multiple of the 64-channel attention heads.
  RandomModelSpec spec = find_preset("rwkv7-tiny");
  spec.n_embd = 96;
  spec.head_size = 32;
  auto file = MappedFile::from_bytes("narrow.safetensors", serialize_safetensors(make_random_model(spec)));
  TensorStore narrow = parse_safetensors(file);
  try {
    expand_rwkv7(narrow, {});
    FAIL() << "expanded n_embd 96";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("multiple of 64"), std::string::npos) << e.what();
  }
  // An incomplete checkpoint is rejected by the config inference, naming the tensor.
  std::vector<TensorData> ts = make_random_model(find_preset("rwkv7-tiny"));
  ts.erase(ts.begin() + 5);
  const std::string dropped = make_random_model(find_preset("rwkv7-tiny"))[5].name;
  auto f2 = MappedFile::from_bytes("holes.safetensors", serialize_safetensors(ts));
  TensorStore holes = parse_safetensors(f2);
  try {
    expand_rwkv7(holes, {});
    FAIL() << "expanded a checkpoint without " << dropped;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(dropped), std::string::npos) << e.what();
  }
  EXPECT_THROW(save_checkpoint("/tmp/x.bin", {}), Error);
}

}  // namespace
}  // namespace rwkvx
