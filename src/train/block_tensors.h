// Parameter pointers of one block, by checkpoint name (spec model.md §1): the bridge between a model's
// named tensors and the op-level tensor structs of src/train/ops/. `get(name)` returns a pointer (const
// for weights, mutable for gradients, null for a frozen tensor's gradient). Shared by the CPU and CUDA
// training models.
#pragma once
#include <string>

#include "model/config.h"
#include "train/ops/channel_mix.h"
#include "train/ops/embedding.h"
#include "train/ops/rwkv7_time_mix.h"
#include "train/ops/sparse_attention.h"

namespace rwkvx::train {

// "rwkv.blocks.3." / "blocks.3." / "moba.1.": the checkpoint name prefix of a block.
inline std::string block_prefix(const ModelConfig& c, const BlockRef& b) {
  return b.kind == BlockRef::Kind::rwkv ? c.prefix + "blocks." + std::to_string(b.index) + "."
                                        : "moba." + std::to_string(b.index) + ".";
}

template <class Get>
auto time_mix_tensors(Get get, const std::string& b, bool first) {
  using P = decltype(get(b));
  TimeMixTensors<P> t{};
  const std::string a = b + "att.";
  t.x_r = get(a + "x_r"), t.x_w = get(a + "x_w"), t.x_k = get(a + "x_k");
  t.x_v = get(a + "x_v"), t.x_a = get(a + "x_a"), t.x_g = get(a + "x_g");
  t.w0 = get(a + "w0"), t.w1 = get(a + "w1"), t.w2 = get(a + "w2");
  t.a0 = get(a + "a0"), t.a1 = get(a + "a1"), t.a2 = get(a + "a2");
  if (!first) t.v0 = get(a + "v0"), t.v1 = get(a + "v1"), t.v2 = get(a + "v2");
  t.g1 = get(a + "g1"), t.g2 = get(a + "g2"), t.k_k = get(a + "k_k"), t.k_a = get(a + "k_a"), t.r_k = get(a + "r_k");
  t.receptance = get(a + "receptance.weight"), t.key = get(a + "key.weight");
  t.value = get(a + "value.weight"), t.output = get(a + "output.weight");
  t.ln_w = get(a + "ln_x.weight"), t.ln_b = get(a + "ln_x.bias");
  return t;
}

template <class Get>
auto head_tensors(Get get, const std::string& prefix) {
  using P = decltype(get(prefix));
  return HeadTensors<P>{get(prefix + "ln_out.weight"), get(prefix + "ln_out.bias"), get(prefix + "head.weight")};
}

template <class Get>
auto channel_mix_tensors(Get get, const std::string& b) {
  using P = decltype(get(b));
  return ChannelMixTensors<P>{get(b + "ffn.x_k"), get(b + "ffn.key.weight"), get(b + "ffn.value.weight")};
}

template <class Get>
auto sparse_attn_tensors(Get get, const std::string& b) {
  using P = decltype(get(b));
  return SparseAttnTensors<P>{get(b + "att.receptance.weight"), get(b + "att.key.weight"),
                              get(b + "att.value.weight"), get(b + "att.output.weight")};
}


}  // namespace rwkvx::train
