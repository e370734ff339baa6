#include "model/config.h"

#include <map>
#include <set>

#include "core/error.h"
#include "core/parse.h"

namespace rwkvx {
namespace {

// Collects the distinct indices <i> of "<prefix><i>." names; checks they are 0..n-1.
int64_t count_indexed(const TensorStore& store, const std::string& prefix) {
  std::set<int64_t> seen;
  for (const auto& [name, t] : store.tensors) {
    if (!name.starts_with(prefix)) continue;
    size_t dot = name.find('.', prefix.size());
    std::string idx = name.substr(prefix.size(), dot == std::string::npos ? std::string::npos : dot - prefix.size());
    bool digits = !idx.empty() && idx.size() < 7 && idx.find_first_not_of("0123456789") == std::string::npos &&
                  (idx == "0" || idx[0] != '0');
    if (!digits || dot == std::string::npos)
      throw Error(store.path + ": tensor '" + name + "': malformed block index in the name");
    seen.insert(std::stoll(idx));
  }
  int64_t expect = 0;
  for (int64_t i : seen) {
    if (i != expect)
      throw Error(store.path + ": block '" + prefix + std::to_string(expect) + "' is missing (found " + prefix +
                  std::to_string(i) + ")");
    ++expect;
  }
  return int64_t(seen.size());
}

const StoredTensor& need(const TensorStore& s, const std::string& name, size_t rank) {
  const StoredTensor& t = s.get(name);
  if (t.shape.size() != rank)
    throw Error(s.path + ": tensor '" + name + "': shape " + t.shape_str() + ", expected rank " + std::to_string(rank));
  return t;
}

}  // namespace

std::string ModelConfig::block_order_str() const {
  std::string s;
  for (const BlockRef& b : exec_order)
    s += (s.empty() ? "" : " ") + std::string(b.kind == BlockRef::Kind::rwkv ? "R" : "M") + std::to_string(b.index);
  return s;
}

std::string ModelConfig::describe() const {
  std::string s;
  s += "architecture:   " + std::string(arch == ArchKind::rwkv7 ? "RWKV-7" : "RWKV-X (RWKV-7 + sparse attention)") + "\n";
  s += "vocab:          " + std::to_string(n_vocab) + "\n";
  s += "n_embd:         " + std::to_string(n_embd) + "\n";
  s += "heads:          " + std::to_string(n_head) + " x " + std::to_string(head_size) + "\n";
  s += "ffn width:      " + std::to_string(n_ffn) + "\n";
  s += "rwkv blocks:    " + std::to_string(n_rwkv) + "\n";
  s += "sparse blocks:  " + std::to_string(n_sparse) + "\n";
  s += "low-rank dims:  w " + std::to_string(dim_w) + ", a " + std::to_string(dim_a) + ", v " +
       std::to_string(dim_v) + ", g " + std::to_string(dim_g) + "\n";
  s += "block order:    " + block_order_str() + "\n";
  if (n_sparse > 0) {
    s += "sparse attn:    chunk " + std::to_string(sparse.chunk) + " (" + chunk_source + "), top-k " +
         std::to_string(sparse.top_k) + " (" + top_k_source + "), " + std::to_string(n_embd / sparse.head_dim) + " heads x " + std::to_string(sparse.head_dim) + "\n";
    s += "kv eviction:    " +
         (eviction.max_len > 0 ? "max " + std::to_string(eviction.max_len) + ", window " +
                                     std::to_string(eviction.window) + ", keep " + std::to_string(eviction.min_len)
                               : std::string("off (exact; cache grows with the context)")) +
         "\n";
    s += "kv cache:       " + std::string(dtype_name(kv_dtype)) + "\n";
  }
  s += "parameters:     " + std::to_string(n_params) + "\n";
  return s;
}

std::vector<TensorSpec> expected_tensors(const ModelConfig& c) {
  const int64_t C = c.n_embd, F = c.n_ffn;
  const std::string p = c.prefix;
  std::vector<TensorSpec> out;
  auto mat = [&](std::string n, int64_t a, int64_t b) { out.push_back({std::move(n), {a, b}, false}); };
  auto vec = [&](std::string n) { out.push_back({std::move(n), {C}, false}); };
  auto coef = [&](std::string n) { out.push_back({std::move(n), {1, 1, C}, true}); };
  mat(p + "emb.weight", c.n_vocab, C);
  vec(p + "blocks.0.ln0.weight");
  vec(p + "blocks.0.ln0.bias");
  for (int64_t i = 0; i < c.n_rwkv; ++i) {
    const std::string b = p + "blocks." + std::to_string(i) + ".";
    for (const char* ln : {"ln1", "ln2"}) {
      vec(b + ln + ".weight");
      vec(b + ln + ".bias");
    }
    for (const char* x : {"x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"}) coef(b + "att." + x);
    mat(b + "att.w1", C, c.dim_w);
    mat(b + "att.w2", c.dim_w, C);
    mat(b + "att.a1", C, c.dim_a);
    mat(b + "att.a2", c.dim_a, C);
    if (i > 0) {
      coef(b + "att.v0");
      mat(b + "att.v1", C, c.dim_v);
      mat(b + "att.v2", c.dim_v, C);
    }
    mat(b + "att.g1", C, c.dim_g);
    mat(b + "att.g2", c.dim_g, C);
    mat(b + "att.r_k", c.n_head, c.head_size);
    for (const char* w : {"receptance", "key", "value", "output"}) mat(b + "att." + w + ".weight", C, C);
    vec(b + "att.ln_x.weight");
    vec(b + "att.ln_x.bias");
    coef(b + "ffn.x_k");
    mat(b + "ffn.key.weight", F, C);
    mat(b + "ffn.value.weight", C, F);
  }
  for (int64_t m = 0; m < c.n_sparse; ++m) {
    const std::string b = "moba." + std::to_string(m) + ".";
    for (const char* ln : {"ln1", "ln2"}) {
      vec(b + ln + ".weight");
      vec(b + ln + ".bias");
    }
    for (const char* w : {"receptance", "key", "value", "output"}) mat(b + "att." + w + ".weight", C, C);
    coef(b + "ffn.x_k");
    mat(b + "ffn.key.weight", F, C);
    mat(b + "ffn.value.weight", C, F);
  }
  vec(p + "ln_out.weight");
  vec(p + "ln_out.bias");
  mat(p + "head.weight", c.n_vocab, C);
  return out;
}

ModelConfig infer_config(const TensorStore& s, const ModelOptions& opt) {
  ModelConfig c;
  for (const auto& [name, t] : s.tensors)
    if (name.starts_with("rwkv.")) c.prefix = "rwkv.";
  c.arch = c.prefix.empty() ? ArchKind::rwkv7 : ArchKind::rwkvx;
  const std::string p = c.prefix;

  const StoredTensor& emb = need(s, p + "emb.weight", 2);
  c.n_vocab = emb.shape[0];
  c.n_embd = emb.shape[1];
  const StoredTensor& rk = need(s, p + "blocks.0.att.r_k", 2);
  c.n_head = rk.shape[0];
  c.head_size = rk.shape[1];
  if (c.n_head * c.head_size != c.n_embd || c.n_embd == 0)
    throw Error(s.path + ": tensor '" + rk.name + "': shape " + rk.shape_str() + " gives heads x head_size = " +
                std::to_string(c.n_head * c.head_size) + ", but n_embd = " + std::to_string(c.n_embd) +
                " (from " + emb.name + ")");
  c.n_ffn = need(s, p + "blocks.0.ffn.key.weight", 2).shape[0];
  c.dim_w = need(s, p + "blocks.0.att.w1", 2).shape[1];
  c.dim_a = need(s, p + "blocks.0.att.a1", 2).shape[1];
  c.dim_g = need(s, p + "blocks.0.att.g1", 2).shape[1];
  c.n_rwkv = count_indexed(s, p + "blocks.");
  c.n_sparse = count_indexed(s, "moba.");
  if (c.n_rwkv > 1) c.dim_v = need(s, p + "blocks.1.att.v1", 2).shape[1];
  if (c.arch == ArchKind::rwkv7 && c.n_sparse > 0)
    throw Error(s.path + ": has 'moba.*' tensors but no 'rwkv.'-prefixed RWKV tensors");

  if (c.n_sparse > 0) {
    if (c.n_embd % 64 != 0)
      throw Error(s.path + ": sparse attention uses heads of 64 channels, but n_embd = " + std::to_string(c.n_embd));
    if (opt.chunk < 0) throw Error("option --chunk-size must be >= 1 (got " + std::to_string(opt.chunk) + ")");
    if (opt.top_k < 0) throw Error("option --top-k must be >= 1 (got " + std::to_string(opt.top_k) + ")");
    if (c.n_sparse >= 2 && c.n_rwkv % c.n_sparse != 0)
      throw Error(s.path + ": " + std::to_string(c.n_rwkv) + " RWKV blocks do not divide into " +
                  std::to_string(c.n_sparse) + " sparse-attention groups; the official code would silently skip the last " +
                  std::to_string(c.n_rwkv % c.n_sparse) + " RWKV block(s), so this checkpoint is refused");
    const KvEvictionParams& e = opt.eviction;
    if (e.max_len > 0 && !(e.window > 0 && e.window < e.min_len && e.min_len <= e.max_len))
      throw Error("KV eviction options need 0 < window < keep <= max (got max " + std::to_string(e.max_len) +
                  ", window " + std::to_string(e.window) + ", keep " + std::to_string(e.min_len) + ")");
  }
  // Chunk size and top-k: the option, else the checkpoint's metadata, else the official default.
  auto pick = [&](int given, const char* key, int fallback, std::string& source) {
    if (given > 0) {
      source = "option";
      return given;
    }
    auto it = s.metadata.find(key);
    if (it == s.metadata.end()) {
      source = "default";
      return fallback;
    }
    const std::string& v = it->second;
    size_t used = 0;
    const long long x = leading_integer(v, used);
    if (v.empty() || used != v.size() || x < 1 || x > (1 << 30))
      throw Error(s.path + ": metadata '" + key + "' is '" + v.substr(0, 40) + "', expected a positive integer");
    source = "checkpoint";
    return int(x);
  };
  c.sparse.chunk = pick(opt.chunk, kMetaChunkSize, kDefaultChunkSize, c.chunk_source);
  c.sparse.top_k = pick(opt.top_k, kMetaTopK, kDefaultTopK, c.top_k_source);
  c.sparse.head_dim = 64;
  c.eviction = opt.eviction;
  if (opt.kv_dtype != DType::f32 && opt.kv_dtype != DType::bf16)
    throw Error("KV cache precision must be f32 or bf16 (got " + std::string(dtype_name(opt.kv_dtype)) + ")");
  c.kv_dtype = opt.kv_dtype;
  if (opt.max_rows_per_call < 0)
    throw Error("rows per forward call must be >= 1, or 0 for the backend's choice (got " +
                std::to_string(opt.max_rows_per_call) + ")");
  c.max_rows_per_call = opt.max_rows_per_call;

  // Execution order (official get_block_exe_order).
  auto rwkv = [&](int64_t i) { c.exec_order.push_back({BlockRef::Kind::rwkv, int(i)}); };
  auto sparse = [&](int64_t m) { c.exec_order.push_back({BlockRef::Kind::sparse, int(m)}); };
  if (c.n_sparse <= 1) {
    for (int64_t i = 0; i < c.n_rwkv; ++i) rwkv(i);
    if (c.n_sparse == 1) sparse(0);
  } else {
    const int64_t group = c.n_rwkv / c.n_sparse;
    for (int64_t m = 0; m < c.n_sparse; ++m) {
      for (int64_t i = m * group; i < (m + 1) * group; ++i) rwkv(i);
      sparse(m);
    }
  }

  // Every expected tensor present with its shape; nothing unexpected.
  std::set<std::string> known;
  c.n_params = 0;
  for (const TensorSpec& spec : expected_tensors(c)) {
    const StoredTensor& t = s.get(spec.name);
    bool ok = t.shape == spec.shape;
    if (spec.vector_like) ok = !t.shape.empty() && t.shape.back() == c.n_embd && t.numel() == c.n_embd;
    if (!ok)
      throw Error(s.path + ": tensor '" + spec.name + "': shape " + t.shape_str() + ", expected " +
                  shape_to_string(spec.shape) + " (n_embd " + std::to_string(c.n_embd) + ", heads " +
                  std::to_string(c.n_head) + "x" + std::to_string(c.head_size) + ", vocab " +
                  std::to_string(c.n_vocab) + ", ffn " + std::to_string(c.n_ffn) + ")");
    known.insert(spec.name);
    c.n_params += t.numel();
  }
  for (const auto& [name, t] : s.tensors)
    if (!known.count(name))
      throw Error(s.path + ": unexpected tensor '" + name + "' (not part of an RWKV-7 / RWKV-X checkpoint)");
  return c;
}

std::map<std::string, std::string> sparse_metadata(int chunk, int top_k, int64_t n_sparse) {
  if (n_sparse == 0) return {};
  return {{kMetaChunkSize, std::to_string(chunk)}, {kMetaTopK, std::to_string(top_k)}};
}

std::map<std::string, std::string> sparse_metadata(const ModelConfig& c) {
  return sparse_metadata(c.sparse.chunk, c.sparse.top_k, c.n_sparse);
}

}  // namespace rwkvx
