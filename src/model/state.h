// What a model carries between calls for each sequence (spec model.md §6): token-shift vectors, WKV
// states, sparse-attention KV caches and the position counter. Tensors have a leading slot dimension so
// one State can hold many sequences for batched decode; a SeqBatch names the slot of each sequence.
#pragma once
#include <vector>

#include "backend/ops.h"

namespace rwkvx {

struct State {
  int n_slots = 0;
  std::vector<Tensor> att_shift;             // per RWKV block: [slots, C] last ln1 output
  std::vector<Tensor> wkv;                   // per RWKV block: [slots, H, N, N] fp32
  std::vector<Tensor> ffn_shift;             // per RWKV block then per sparse block: [slots, C] last ln2 output
  std::vector<std::vector<KvCache>> kv;      // [sparse block][slot]
  std::vector<int64_t> pos;                  // [slot] tokens consumed
};

}  // namespace rwkvx
