// RWKV-7 → RWKV-X expansion (spec system.md §3.2 placement, §3.3 initialisation).
#include "train/expand.h"

#include <cmath>
#include <cstring>
#include <map>

#include "core/error.h"
#include "model/formats/pth_writer.h"
#include "train/data/splitmix.h"

namespace rwkvx {
namespace {

// fp32 -> IEEE binary16, round to nearest even (subnormals, overflow to inf, nan kept).
uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000;
  const uint32_t abs = u & 0x7fffffff;
  if (abs > 0x7f800000) return uint16_t(sign | 0x7e00);
  if (abs >= 0x477ff000) return uint16_t(sign | 0x7c00);  // rounds to >= 65520: inf
  if (abs < 0x38800000) {                                  // below the smallest normal half (2^-14)
    if (abs < 0x33000000) return uint16_t(sign);           // below half the smallest subnormal
    const uint32_t exp = abs >> 23, man = (abs & 0x7fffff) | 0x800000;
    // value = man * 2^(exp - 150) = h * 2^-24 (half subnormal step)  =>  h = man >> (126 - exp)
    const uint32_t shift = 126 - exp;
    uint32_t h = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) ++h;
    return uint16_t(sign | h);
  }
  uint32_t h = ((abs >> 13) - ((127 - 15) << 10));
  const uint32_t rem = abs & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
  return uint16_t(sign | h);
}

TensorData encode(std::string name, DType dtype, std::vector<int64_t> shape, const std::vector<float>& v) {
  TensorData t{std::move(name), dtype, std::move(shape), {}};
  t.bytes.resize(v.size() * dtype_size(dtype));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DType::f32) {
      std::memcpy(t.bytes.data() + 4 * i, &v[i], 4);
    } else {
      const uint16_t h = dtype == DType::bf16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
      std::memcpy(t.bytes.data() + 2 * i, &h, 2);
    }
  }
  return t;
}

TensorData copy_tensor(const StoredTensor& s, std::string name) {
  TensorData t{std::move(name), s.dtype, s.shape, {}};
  t.bytes.assign(s.data, s.data + s.nbytes());
  return t;
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

}  // namespace

ExpandInit parse_expand_init(const std::string& name) {
  if (name == "paper" || name == "llamapro") return ExpandInit::paper;
  if (name == "official" || name == "copy") return ExpandInit::official;
  if (name == "random") return ExpandInit::random;
  throw Error("unknown --init '" + name + "' (choose paper (alias llamapro), official (alias copy) or random)");
}

const char* expand_init_name(ExpandInit init) {
  switch (init) {
    case ExpandInit::paper: return "paper";
    case ExpandInit::official: return "official";
    case ExpandInit::random: return "random";
  }
  return "?";
}

int64_t default_sparse_count(int64_t n_rwkv) {
  if (n_rwkv >= 3 && n_rwkv % 3 == 0) return n_rwkv / 3;
  if (n_rwkv >= 4 && n_rwkv % 4 == 0) return n_rwkv / 4;
  throw Error("no default number of sparse blocks for " + std::to_string(n_rwkv) +
              " RWKV blocks (the default is one per 3 or per 4 blocks): give --sparse-layers N with N = 1 or a "
              "divisor of " + std::to_string(n_rwkv));
}

std::vector<int64_t> sparse_block_positions(int64_t n_rwkv, int64_t n_sparse) {
  if (n_sparse < 1 || n_sparse > n_rwkv)
    throw Error("--sparse-layers: " + std::to_string(n_sparse) + " sparse blocks for a model of " +
                std::to_string(n_rwkv) + " RWKV blocks (need 1.." + std::to_string(n_rwkv) + ")");
  if (n_sparse > 1 && n_rwkv % n_sparse != 0)
    throw Error("--sparse-layers: " + std::to_string(n_sparse) + " does not divide the " + std::to_string(n_rwkv) +
                " RWKV blocks; the official layout (system.md §3.2) would silently drop the last " +
                std::to_string(n_rwkv % n_sparse) + " RWKV block(s), so it is refused");
  std::vector<int64_t> pos;
  const int64_t r = n_rwkv / n_sparse;
  for (int64_t j = 0; j < n_sparse; ++j) pos.push_back((j + 1) * r - 1);
  return pos;
}

int64_t parse_sparse_layers(const std::string& text, int64_t n_rwkv) {
  std::vector<int64_t> values;
  size_t i = 0;
  while (true) {
    size_t j = text.find(',', i);
    std::string item = text.substr(i, j == std::string::npos ? std::string::npos : j - i);
    while (!item.empty() && item.front() == ' ') item.erase(0, 1);
    while (!item.empty() && item.back() == ' ') item.pop_back();
    if (item.empty() || item.size() > 9 || item.find_first_not_of("0123456789") != std::string::npos)
      throw Error("--sparse-layers '" + text + "': expected a count (e.g. 4) or a comma-separated list of RWKV "
                  "block indices (e.g. 2,5,8,11), got '" + item + "'");
    values.push_back(std::stoll(item));
    if (j == std::string::npos) break;
    i = j + 1;
  }
  if (values.size() == 1) {
    sparse_block_positions(n_rwkv, values[0]);
    return values[0];
  }
  const int64_t n = int64_t(values.size());
  std::vector<int64_t> expect;
  try {
    expect = sparse_block_positions(n_rwkv, n);
  } catch (const Error&) {
    expect.clear();
  }
  if (values != expect) {
    std::string want;
    for (int64_t p : expect) want += (want.empty() ? "" : ",") + std::to_string(p);
    throw Error("--sparse-layers '" + text + "': sparse blocks cannot be placed freely: the official layout "
                "(system.md §3.2) puts " + std::to_string(n) + " blocks after RWKV blocks " +
                (want.empty() ? std::string("(none: ") + std::to_string(n) + " does not divide " +
                                    std::to_string(n_rwkv) + ")"
                              : want) +
                " of " + std::to_string(n_rwkv));
  }
  return n;
}

ExpandResult expand_rwkv7(const TensorStore& src, const ExpandOptions& opt) {
  ExpandResult res;
  res.source = infer_config(src, ModelOptions{});
  const ModelConfig& c = res.source;
  if (c.n_sparse > 0)
    throw Error(src.path + ": already an RWKV-X checkpoint (" + std::to_string(c.n_sparse) +
                " sparse blocks 'moba.*'); expand takes an RWKV-7 checkpoint");
  if (c.n_embd % 64 != 0)
    throw Error(src.path + ": n_embd = " + std::to_string(c.n_embd) +
                " is not a multiple of 64, the sparse-attention head size");
  res.n_sparse = opt.n_sparse > 0 ? opt.n_sparse : default_sparse_count(c.n_rwkv);
  res.positions = sparse_block_positions(c.n_rwkv, res.n_sparse);

  ModelConfig out_cfg = c;
  out_cfg.arch = ArchKind::rwkvx;
  out_cfg.prefix = "rwkv.";
  out_cfg.n_sparse = res.n_sparse;
  const int64_t C = c.n_embd;

  // RWKV tensors, renamed, in module order.
  for (const TensorSpec& spec : expected_tensors(c))
    res.tensors.push_back(copy_tensor(src.get(spec.name), "rwkv." + spec.name.substr(c.prefix.size())));

  SplitMix64 rng(opt.seed);
  for (int64_t j = 0; j < res.n_sparse; ++j) {
    const std::string s = c.prefix + "blocks." + std::to_string(res.positions[size_t(j)]) + ".";
    const std::string m = "moba." + std::to_string(j) + ".";
    auto like = [&](const std::string& src_name) -> const StoredTensor& { return src.get(s + src_name); };
    auto filled = [&](const std::string& name, const StoredTensor& ref, auto value) {
      std::vector<float> v(size_t(numel_of(ref.shape)));
      for (size_t k = 0; k < v.size(); ++k) v[k] = value(k);
      res.tensors.push_back(encode(m + name, ref.dtype, ref.shape, v));
    };
    auto zeros = [&](const std::string& name, const StoredTensor& ref) { filled(name, ref, [](size_t) { return 0.0f; }); };
    auto uniform = [&](const std::string& name, const StoredTensor& ref, double a) {
      filled(name, ref, [&](size_t) { return rng.uniform(a); });
    };

    // LayerNorms: nn.LayerNorm defaults, never copied.
    for (const char* ln : {"ln1", "ln2"}) {
      filled(std::string(ln) + ".weight", like(std::string(ln) + ".weight"), [](size_t) { return 1.0f; });
      zeros(std::string(ln) + ".bias", like(std::string(ln) + ".bias"));
    }
    const double a_rv = 0.5 / std::sqrt(double(C)), a_k = 0.05 / std::sqrt(double(C));
    if (opt.init == ExpandInit::random) {
      uniform("att.receptance.weight", like("att.receptance.weight"), a_rv);
      uniform("att.key.weight", like("att.key.weight"), a_k);
      uniform("att.value.weight", like("att.value.weight"), a_rv);
      zeros("att.output.weight", like("att.output.weight"));
    } else {
      for (const char* w : {"receptance", "key", "value"})
        res.tensors.push_back(copy_tensor(like(std::string("att.") + w + ".weight"), m + "att." + w + ".weight"));
      if (opt.init == ExpandInit::official)
        res.tensors.push_back(copy_tensor(like("att.output.weight"), m + "att.output.weight"));
      else
        zeros("att.output.weight", like("att.output.weight"));
    }
    // RWKV_CMix_x070(args, layer_id = j): x_k[c] = 1 − (c/C)^((1 − j/n_layer)^4), in fp32 as torch does.
    const float expo = float(std::pow(1.0 - double(j) / double(c.n_rwkv), 4.0));
    filled("ffn.x_k", like("ffn.x_k"), [&](size_t k) {
      return 1.0f - std::pow(float(double(k) / double(C)), expo);
    });
    if (opt.init == ExpandInit::random) {
      uniform("ffn.key.weight", like("ffn.key.weight"), a_rv);
      zeros("ffn.value.weight", like("ffn.value.weight"));
    } else {
      res.tensors.push_back(copy_tensor(like("ffn.key.weight"), m + "ffn.key.weight"));
      if (opt.init == ExpandInit::official)
        res.tensors.push_back(copy_tensor(like("ffn.value.weight"), m + "ffn.value.weight"));
      else
        zeros("ffn.value.weight", like("ffn.value.weight"));
    }
  }

  // Self-check: exactly the tensors an RWKV-X checkpoint of this shape has.
  const std::vector<TensorSpec> want = expected_tensors(out_cfg);
  RWKVX_ASSERT(want.size() == res.tensors.size(), "expand: tensor count differs from the RWKV-X layout");
  std::map<std::string, const TensorData*> by_name;
  for (const TensorData& t : res.tensors) by_name[t.name] = &t;
  for (const TensorSpec& w : want) {
    auto it = by_name.find(w.name);
    RWKVX_ASSERT(it != by_name.end(), "expand: missing " + w.name);
    RWKVX_ASSERT(w.vector_like ? numel_of(it->second->shape) == C : it->second->shape == w.shape,
                 "expand: wrong shape for " + w.name);
  }
  return res;
}

void save_checkpoint(const std::string& path, const std::vector<TensorData>& tensors,
                     const std::map<std::string, std::string>& metadata) {
  if (path.ends_with(".pth")) {
    save_pth(path, tensors);
  } else if (path.ends_with(".safetensors")) {
    save_safetensors(path, tensors, metadata);
  } else {
    throw Error(path + ": unknown checkpoint extension (use .pth or .safetensors)");
  }
}

}  // namespace rwkvx
