#include "model/random_init.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace rwkvx {
namespace {

// splitmix64 + Box–Muller: portable, unlike std::normal_distribution.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed * 0x9e3779b97f4a7c15ull + 1) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double normal() {
    const double u = 1.0 - uniform(), v = uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
  }

 private:
  uint64_t s_;
};

bool ends_with(const std::string& s, const char* suffix) { return s.ends_with(suffix); }

// torch.nn.init.orthogonal_ as RWKV-LM's ortho_init uses it: a [rows, cols] matrix whose rows (rows <= cols)
// or columns (rows > cols) are orthonormal, times scale · sqrt(rows / cols) when rows > cols. Modified
// Gram–Schmidt over normal draws (portable; torch's QR draws differ, the distribution is the same).
std::vector<float> orthogonal(Rng& rng, int64_t rows, int64_t cols, double scale) {
  const bool by_cols = rows > cols;
  const int64_t n = by_cols ? cols : rows, len = by_cols ? rows : cols;
  std::vector<double> q(size_t(n * len));
  for (double& x : q) x = rng.normal();
  for (int64_t i = 0; i < n; ++i) {
    double* qi = q.data() + i * len;
    for (int64_t j = 0; j < i; ++j) {
      const double* qj = q.data() + j * len;
      double d = 0;
      for (int64_t k = 0; k < len; ++k) d += qi[k] * qj[k];
      for (int64_t k = 0; k < len; ++k) qi[k] -= d * qj[k];
    }
    double nrm = 0;
    for (int64_t k = 0; k < len; ++k) nrm += qi[k] * qi[k];
    nrm = std::sqrt(nrm);
    for (int64_t k = 0; k < len; ++k) qi[k] /= nrm;
  }
  const double gain = scale * (by_cols ? std::sqrt(double(rows) / double(cols)) : 1.0);
  std::vector<float> out(size_t(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      out[size_t(r * cols + c)] = float(gain * (by_cols ? q[size_t(c * len + r)] : q[size_t(r * len + c)]));
  return out;
}

// The official RWKV-7 training init (RWKV-LM RWKV-v7 train_temp model.py: RWKV_Tmix_x070 / RWKV_CMix_x070
// __init__ and RWKV.generate_init).
std::vector<float> train_init_values(const TensorSpec& t, const ModelConfig& c, Rng& rng) {
  const std::string& nm = t.name;
  const int64_t C = c.n_embd, N = c.head_size;
  int64_t numel = 1;
  for (int64_t d : t.shape) numel *= d;
  std::vector<float> v(size_t(numel), 0.0f);
  auto fill = [&](auto f) {
    for (size_t i = 0; i < v.size(); ++i) v[i] = float(f(int64_t(i)));
  };
  auto uniform = [&](double a) { fill([&](int64_t) { return a * (2.0 * rng.uniform() - 1.0); }); };
  // Layer id from "…blocks.<i>."; the ramps of the official init.
  int64_t layer = 0;
  if (const size_t at = nm.find("blocks."); at != std::string::npos) layer = std::stoll(nm.substr(at + 7));
  const double L = double(c.n_rwkv);
  const double r01 = L > 1 ? double(layer) / (L - 1) : 0.0, r10 = 1.0 - double(layer) / L;
  auto ddd = [&](int64_t i) { return double(i) / double(C); };
  auto linear = [&](int64_t n) { return double(n) / double(C - 1) - 0.5; };
  auto zigzag = [&](int64_t n) {
    double z = (double(n % N) - double(N - 1) / 2.0) / (double(N - 1) / 2.0);
    return z * std::abs(z);
  };
  auto is = [&](const char* suffix) { return ends_with(nm, suffix); };
  if (is("ln0.weight") || is("ln1.weight") || is("ln2.weight") || is("ln_out.weight") || is("ln_x.weight")) {
    fill([](int64_t) { return 1.0; });
  } else if (is(".bias")) {
    // zeros
  } else if (is("att.x_r") || is("att.x_g")) {
    fill([&](int64_t i) { return 1.0 - std::pow(ddd(i), 0.2 * r10); });
  } else if (is("att.x_w") || is("att.x_a")) {
    fill([&](int64_t i) { return 1.0 - std::pow(ddd(i), 0.9 * r10); });
  } else if (is("att.x_k") || is("att.x_v")) {
    fill([&](int64_t i) { return 1.0 - std::pow(ddd(i), 0.7 * r10); });
  } else if (is("ffn.x_k")) {
    fill([&](int64_t i) { return 1.0 - std::pow(ddd(i), r10 * r10 * r10 * r10); });
  } else if (is("att.w0")) {
    fill([&](int64_t n) {
      const double www = -6.0 + 6.0 * std::pow(double(n) / double(C - 1), 1.0 + std::pow(r01, 0.3));
      return www + 0.5 + zigzag(n) * 2.5;
    });
  } else if (is("att.a0")) {
    fill([&](int64_t n) { return -0.19 + zigzag(n) * 0.3 + linear(n) * 0.4; });
  } else if (is("att.v0")) {
    fill([&](int64_t n) { return 0.73 - linear(n) * 0.4; });
  } else if (is("att.k_k")) {
    fill([&](int64_t n) { return 0.71 - linear(n) * 0.1; });
  } else if (is("att.k_a")) {
    fill([](int64_t) { return 1.02; });
  } else if (is("att.r_k")) {
    fill([](int64_t) { return -0.04; });
  } else if (is("att.w1") || is("att.a1") || is("att.v1") || is("att.g1")) {
    // zeros
  } else if (is("att.w2") || is("att.a2") || is("att.v2") || is("att.g2")) {
    v = orthogonal(rng, t.shape[0], t.shape[1], 0.1);
  } else if (is("att.receptance.weight") || is("att.value.weight") || is("ffn.key.weight")) {
    uniform(0.5 / std::sqrt(double(C)));
  } else if (is("att.key.weight")) {
    uniform(0.05 / std::sqrt(double(C)));
  } else if (is("att.output.weight") || is("ffn.value.weight")) {
    // zeros
  } else if (is("emb.weight")) {
    uniform(1e-4);
  } else if (is("head.weight")) {
    v = orthogonal(rng, t.shape[0], t.shape[1], 0.5);
  } else {
    throw Error("train init: no rule for tensor '" + nm + "'");
  }
  return v;
}

}  // namespace

std::vector<TensorData> make_random_model(const RandomModelSpec& spec) {
  ModelConfig c;
  c.arch = spec.n_sparse > 0 ? ArchKind::rwkvx : ArchKind::rwkv7;
  c.prefix = spec.n_sparse > 0 ? "rwkv." : "";
  c.n_vocab = spec.n_vocab;
  c.n_embd = spec.n_embd;
  c.head_size = spec.head_size;
  c.n_head = spec.n_embd / spec.head_size;
  c.n_ffn = 4 * spec.n_embd;
  c.n_rwkv = spec.n_rwkv;
  c.n_sparse = spec.n_sparse;
  c.dim_w = spec.dim_w, c.dim_a = spec.dim_a, c.dim_v = spec.dim_v, c.dim_g = spec.dim_g;
  Rng rng(spec.seed);
  std::vector<TensorData> out;
  if (spec.train_init) {
    if (spec.n_sparse > 0)
      throw Error("the RWKV-7 training init makes RWKV-7 models only; add sparse blocks with `rwkvx expand`");
    for (const TensorSpec& t : expected_tensors(c))
      out.push_back(make_tensor_data(t.name, spec.dtype, t.shape, train_init_values(t, c, rng)));
    return out;
  }
  for (const TensorSpec& t : expected_tensors(c)) {
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    std::vector<float> v(static_cast<size_t>(n));
    const std::string& nm = t.name;
    const double fan_in = double(t.shape.back());
    auto fill = [&](auto f) {
      for (float& x : v) x = float(f());
    };
    if (ends_with(nm, "ln0.weight") || ends_with(nm, "ln1.weight") || ends_with(nm, "ln2.weight") ||
        ends_with(nm, "ln_out.weight") || ends_with(nm, "ln_x.weight")) {
      fill([&] { return 1.0 + 0.1 * rng.normal(); });
    } else if (ends_with(nm, ".bias")) {
      fill([&] { return 0.1 * rng.normal(); });
    } else if (nm.find(".att.x_") != std::string::npos || ends_with(nm, "ffn.x_k") || ends_with(nm, "k_a")) {
      fill([&] { return rng.uniform(); });
    } else if (ends_with(nm, "att.w0")) {
      fill([&] { return -6.0 + 5.0 * rng.uniform(); });  // decays spread from ~0.99 to ~0.6
    } else if (ends_with(nm, "att.a0") || ends_with(nm, "att.v0")) {
      fill([&] { return rng.normal(); });
    } else if (ends_with(nm, "att.k_k")) {
      fill([&] { return 0.5 + 0.5 * rng.uniform(); });
    } else if (ends_with(nm, "att.r_k")) {
      fill([&] { return 0.3 * rng.normal(); });
    } else if (ends_with(nm, "emb.weight")) {
      fill([&] { return rng.normal(); });
    } else if (t.shape.size() == 2 && !ends_with(nm, ".weight")) {
      // Low-rank matrices, used as stored (x @ w1): fan-in is the first dimension.
      fill([&] { return rng.normal() / std::sqrt(double(t.shape[0])); });
    } else {
      fill([&] { return rng.normal() / std::sqrt(fan_in); });
    }
    out.push_back(make_tensor_data(nm, spec.dtype, t.shape, v));
  }
  return out;
}

}  // namespace rwkvx

namespace rwkvx {

void rwkv7_lora_dims(int64_t C, RandomModelSpec& s) {
  // BlinkDL RWKV-LM v7: widths are multiples of 32 scaled with sqrt(C) (decay, a, v) or C^0.8 (gate).
  auto r32 = [](double x) { return std::max<int64_t>(32, int64_t(std::lround(x / 32.0)) * 32); };
  s.dim_w = r32(1.8 * std::sqrt(double(C)));
  s.dim_a = r32(1.8 * std::sqrt(double(C)));
  s.dim_v = r32(1.3 * std::sqrt(double(C)));
  s.dim_g = r32(0.6 * std::pow(double(C), 0.8));
}

const std::vector<ModelPreset>& model_presets() {
  static const std::vector<ModelPreset> presets = [] {
    auto make = [](int64_t L, int64_t C, int64_t n_sparse, int64_t vocab, bool lora_formula) {
      RandomModelSpec s;
      s.n_rwkv = L, s.n_embd = C, s.n_sparse = n_sparse, s.n_vocab = vocab, s.dtype = DType::bf16;
      if (lora_formula) rwkv7_lora_dims(C, s);
      return s;
    };
    return std::vector<ModelPreset>{
        {"rwkv7-0.1b", "RWKV-7 World 0.1B shapes: L12 D768, vocab 65536", make(12, 768, 0, 65536, true)},
        {"rwkv7-0.4b", "RWKV-7 World 0.4B shapes: L24 D1024, vocab 65536", make(24, 1024, 0, 65536, true)},
        {"rwkv7-1.5b", "RWKV-7 World 1.5B shapes: L24 D2048, vocab 65536", make(24, 2048, 0, 65536, true)},
        {"rwkvx-0.2b", "RWKV-X 0.2B of the paper: RWKV-7 0.1B + 4 sparse blocks (after R2, R5, R8, R11)",
         make(12, 768, 4, 65536, true)},
        {"rwkv7-tiny", "test size: L4 D128, vocab 300 (like the golden rwkv7-tiny)", make(4, 128, 0, 300, false)},
        {"rwkvx-tiny", "test size: L4 D128 + 2 sparse blocks, vocab 300 (like the golden rwkvx-tiny)",
         make(4, 128, 2, 300, false)},
    };
  }();
  return presets;
}

RandomModelSpec find_preset(const std::string& name) {
  std::string names;
  for (const ModelPreset& p : model_presets()) {
    if (name == p.name) return p.spec;
    names += (names.empty() ? "" : ", ") + std::string(p.name);
  }
  throw Error("unknown preset '" + name + "' (choose one of: " + names + ")");
}

}  // namespace rwkvx
