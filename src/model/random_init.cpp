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
