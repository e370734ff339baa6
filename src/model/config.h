// The model description: configuration inferred from a checkpoint's tensor names and shapes, the
// tensors each architecture requires, and the block execution order (spec model.md §1.3–1.4).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "backend/ops.h"
#include "model/formats/tensor_store.h"

namespace rwkvx {

enum class ArchKind { rwkv7, rwkvx };

// Official checkpoints do not store the sparse-attention chunk size and top-k; rwkvx's safetensors
// files (written by `rwkvx train` and `rwkvx expand`) do, under these "__metadata__" keys.
inline constexpr const char* kMetaChunkSize = "rwkvx.chunk_size";
inline constexpr const char* kMetaTopK = "rwkvx.top_k";
inline constexpr int kDefaultChunkSize = 2048;  // the official defaults, used when neither the options
inline constexpr int kDefaultTopK = 3;          // nor the checkpoint give a value

// Load-time options.
struct ModelOptions {
  // Sparse-attention chunk size and chunks per query (own chunk included). 0: the checkpoint's
  // `rwkvx.chunk_size` / `rwkvx.top_k` metadata, else the official 2048 / 3.
  int chunk = 0;
  int top_k = 0;
  KvEvictionParams eviction;   // off unless eviction.max_len > 0
  DType kv_dtype = DType::f32;  // KV-cache storage: f32 (exact) or bf16 (half the memory, keys/values rounded)
  // Rows per internal forward call: longer inputs run in pieces of this many rows (split prefill equals the
  // whole), so activations stay bounded at any context length. 0: the backend's preferred_rows_per_call().
  int64_t max_rows_per_call = 0;
};

struct BlockRef {
  enum class Kind { rwkv, sparse } kind;
  int index;  // RWKV block i or sparse block m
};

struct ModelConfig {
  ArchKind arch = ArchKind::rwkv7;
  std::string prefix;  // "" for plain RWKV-7 names, "rwkv." for RWKV-X
  int64_t n_vocab = 0, n_embd = 0, n_head = 0, head_size = 0, n_ffn = 0;
  int64_t n_rwkv = 0, n_sparse = 0;
  int64_t dim_w = 0, dim_a = 0, dim_v = 0, dim_g = 0;  // low-rank widths
  SparseAttnParams sparse;
  KvEvictionParams eviction;
  DType kv_dtype = DType::f32;
  int64_t max_rows_per_call = 512;
  std::vector<BlockRef> exec_order;
  int64_t n_params = 0;
  // Where sparse.chunk / sparse.top_k came from: "option", "checkpoint" (metadata) or "default".
  std::string chunk_source = "default", top_k_source = "default";

  std::string block_order_str() const;  // e.g. "R0 R1 M0 R2 R3 M1"
  std::string describe() const;         // multi-line human summary
};

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  bool vector_like = false;  // [1,1,C] coefficients: any shape with numel C and last dim C is accepted
};

// Infers and validates the configuration: every required tensor present with its shape, no unknown
// tensors, a block layout the official code would run whole. Throws rwkvx::Error naming the file and
// tensor at fault.
ModelConfig infer_config(const TensorStore& store, const ModelOptions& options);

// The metadata rwkvx stores with a model: chunk size and top-k for RWKV-X (nothing for RWKV-7).
std::map<std::string, std::string> sparse_metadata(int chunk, int top_k, int64_t n_sparse);
std::map<std::string, std::string> sparse_metadata(const ModelConfig& cfg);

// Every tensor of the architecture with its expected shape, in a stable order.
std::vector<TensorSpec> expected_tensors(const ModelConfig& cfg);

}  // namespace rwkvx
