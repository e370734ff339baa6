// RWKV-7 → RWKV-X expansion (spec system.md §3): renames the RWKV-7 tensors under `rwkv.` and adds
// `moba.{j}` sparse-attention blocks at the places the official code runs them (§3.2), initialised as
// §3.3 describes. Used by `rwkvx expand` and by training (stage 1 starts from an expanded model).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/formats/safetensors_writer.h"
#include "model/formats/tensor_store.h"

namespace rwkvx {

enum class ExpandInit {
  // LLaMA-Pro style (the paper; spec [REC] `llamapro`, the default): copy the official way, then zero
  // att.output.weight and ffn.value.weight, the two projections that write into the residual stream.
  // The expanded model's logits equal the source's exactly.
  paper,
  // The official code (`RWKVHybrid.init_moba_from_rwkv`; spec `copy`): attention r/k/v/output and FFN
  // key/value copied from RWKV block (j+1)·r − 1, LayerNorms 1/0, ffn.x_k from the channel-mix formula.
  // Not function-preserving. Fully determined by the source: no random numbers survive the copy.
  official,
  // The official temporary init without the copy (spec `random`): r, v ~ U(±0.5/√C), k ~ U(±0.05/√C),
  // ffn.key ~ U(±0.5/√C), output and ffn.value zero (so also function-preserving). Seeded.
  random,
};

// Parses "paper" | "llamapro" | "official" | "copy" | "random"; throws rwkvx::Error listing them.
ExpandInit parse_expand_init(const std::string& name);
const char* expand_init_name(ExpandInit init);

struct ExpandOptions {
  int64_t n_sparse = 0;  // 0: default_sparse_count(n_layer)
  ExpandInit init = ExpandInit::paper;
  uint64_t seed = 1;     // only `random` draws numbers
};

// Number of sparse blocks when none is asked for: one per 3 RWKV blocks when n_layer is a multiple of 3
// (the released 0.2B: 12 → 4), else one per 4 when it is a multiple of 4 (the 3.6B: 32 → 8). Throws
// rwkvx::Error asking for --sparse-layers otherwise.
int64_t default_sparse_count(int64_t n_rwkv);

// RWKV block index after which each sparse block runs (§3.2): for n_sparse = 1 the last block, else
// (j+1)·(n_rwkv / n_sparse) − 1. Throws rwkvx::Error when n_sparse is out of 1..n_rwkv or does not divide
// n_rwkv (the official code would silently drop the remainder).
std::vector<int64_t> sparse_block_positions(int64_t n_rwkv, int64_t n_sparse);

// `--sparse-layers` value: a count ("4") or the list of RWKV blocks the sparse blocks follow ("2,5,8,11"),
// which must be the §3.2 layout for that many blocks (positions are implied by the count in the official
// format, so no other list can be stored). Returns the count.
int64_t parse_sparse_layers(const std::string& text, int64_t n_rwkv);

struct ExpandResult {
  std::vector<TensorData> tensors;  // state_dict order: rwkv.* (module order), then moba.*
  ModelConfig source;               // the RWKV-7 checkpoint's configuration
  int64_t n_sparse = 0;
  std::vector<int64_t> positions;   // sparse_block_positions(source.n_rwkv, n_sparse)
};

// Expands an RWKV-7 checkpoint (plain names, or `rwkv.`-prefixed without sparse blocks). Every tensor
// keeps its dtype and shape; new tensors take the dtype of the RWKV tensor they correspond to. Throws
// rwkvx::Error naming the file for an RWKV-X source, an invalid checkpoint or an impossible layout.
ExpandResult expand_rwkv7(const TensorStore& source, const ExpandOptions& options);

// Writes tensors as .pth or .safetensors, chosen by the extension of `path` (atomically); `metadata` goes
// into the safetensors header (a .pth file has no place for it). Throws rwkvx::Error for any other extension.
void save_checkpoint(const std::string& path, const std::vector<TensorData>& tensors,
                     const std::map<std::string, std::string>& metadata = {});

}  // namespace rwkvx
