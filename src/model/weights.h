// Model weights as backend tensors, grouped per block. Names follow the checkpoint (spec model.md §1.3).
#pragma once
#include <vector>

#include "backend/tensor.h"

namespace rwkvx {

struct LayerNormWeights {
  Tensor weight, bias;  // [C]
};

struct ChannelMixWeights {
  Tensor x_k;         // [C]
  Tensor key, value;  // [F, C], [C, F] (Linear layout)
};

struct TimeMixWeights {
  Tensor x_r, x_w, x_k, x_v, x_a, x_g;        // [C] token-shift lerp coefficients
  Tensor w0, w1, w2, a0, a1, a2, v0, v1, v2;  // [C], [C, D*], [D*, C]; v* empty in block 0
  Tensor g1, g2, k_k, k_a;
  Tensor r_k;                                 // [H, N]
  Tensor receptance, key, value, output;      // [C, C] Linear
  LayerNormWeights ln_x;                      // GroupNorm over heads
};

struct RwkvBlockWeights {
  LayerNormWeights ln1, ln2;
  TimeMixWeights att;
  ChannelMixWeights ffn;
};

struct SparseBlockWeights {
  LayerNormWeights ln1, ln2;
  Tensor query, key, value, output;  // [C, C] Linear (checkpoint: receptance/key/value/output)
  ChannelMixWeights ffn;
};

struct ModelWeights {
  Tensor emb;  // [V, C]
  LayerNormWeights ln0, ln_out;
  Tensor head;  // [V, C]
  std::vector<RwkvBlockWeights> rwkv;
  std::vector<SparseBlockWeights> sparse;
};

}  // namespace rwkvx
