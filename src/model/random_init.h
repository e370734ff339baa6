// Random-weight checkpoints with the official tensor names: for tests (fresh models beyond the golden
// ones) and `rwkvx init`. Values are drawn from a portable generator, so a seed gives the same file on
// every platform.
#pragma once
#include <cstdint>
#include <vector>

#include "model/config.h"
#include "model/formats/safetensors_writer.h"

namespace rwkvx {

struct RandomModelSpec {
  int64_t n_vocab = 300, n_embd = 128, head_size = 64, n_rwkv = 2, n_sparse = 0;
  int64_t dim_w = 32, dim_a = 32, dim_v = 32, dim_g = 32;  // n_ffn = 4 * n_embd
  DType dtype = DType::f32;
  uint64_t seed = 1;
  // false: values for tests and benchmarks (every tensor non-zero, activations in a realistic range).
  // true: the official RWKV-7 training init (BlinkDL RWKV-LM v7 `generate_init` / block __init__: per-layer
  // token-shift ramps, decay and rate biases, zero first LoRA matrices and output projections, orthogonal
  // second LoRA matrices and head, embedding U(±1e-4)); RWKV-7 only (n_sparse 0: add sparse blocks with
  // `rwkvx expand`).
  bool train_init = false;
};

// Tensors of a model whose activations stay in a realistic range (LayerNorms near 1, decays spread
// over (0, 1), projections scaled by 1/sqrt(fan_in)).
std::vector<TensorData> make_random_model(const RandomModelSpec& spec);

}  // namespace rwkvx

namespace rwkvx {

struct ModelPreset {
  const char* name;
  const char* description;
  RandomModelSpec spec;
};

// Named shapes of official models (RWKV-7 World 0.1B/0.4B/1.5B, RWKV-X 0.2B of the paper) and tiny test
// models. Low-rank widths follow the RWKV-7 formulas (rwkv7_lora_dims).
const std::vector<ModelPreset>& model_presets();
// Throws rwkvx::Error listing the valid names.
RandomModelSpec find_preset(const std::string& name);
// RWKV-7's low-rank widths for width C: decay, in-context rate, value residual, gate.
void rwkv7_lora_dims(int64_t C, RandomModelSpec& spec);

}  // namespace rwkvx
