// The `rwkvx train CONFIG` configuration: a JSON object whose keys are documented (with their defaults)
// in docs/training.md. A stage preset ("stage1", "stage2", "sft") sets the official recipe of spec
// system.md §4.8; every other key overrides one value. Unknown keys and values of the wrong type are
// errors naming the key.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "train/optimizer.h"
#include "train/train_model.h"

namespace rwkvx::train {

// stage1: only the sparse-attention blocks train (freeze_all_but_sparse), short context, plain CE.
// stage2: every parameter, long context, LongCE. sft: every parameter, loss on responses only (§4.9).
enum class TrainStage { stage1, stage2, sft };
const char* stage_name(TrainStage s);

struct TrainConfig {
  std::string source;  // the config file (for messages); relative paths below are resolved against its folder

  TrainStage stage = TrainStage::stage2;
  std::string model;    // RWKV-7 or RWKV-X checkpoint (.pth / .safetensors)
  std::string data;     // stage1/2: binidx prefix; sft: jsonl file
  std::string vocab;    // sft: World vocab ("" = the default vocab)
  std::string out_dir;

  int64_t ctx_len = 0;
  int64_t micro_bsz = 0;
  int64_t steps = 0;         // optimizer steps of the whole run (0 = until the data or token budget ends)
  int64_t tokens = -1;       // my_exit_tokens (pretrain); -1 = the dataset's token count; 0 = no budget
  uint64_t magic_prime = 0;  // 0 = computed from the data (spec §4.2)
  int64_t epoch_steps = 1000;
  int64_t epoch_count = 0;   // sft: mini-epochs of the run (official 2); pretrain: the lr decay span
  int64_t epoch_begin = 0;

  LossKind loss = LossKind::ce;
  bool l2wrap = true;
  int64_t pad_multiple = 16;
  int64_t longce_truncated = 4000, longce_window = 4000;
  double longce_cap = 10.0;

  double lr_init = 1e-5, lr_final = 1e-5;
  int64_t warmup_steps = 10;
  double weight_decay = 1e-3, weight_decay_final = 0;
  double beta1 = 0.9, beta2 = 0.99, eps = 1e-18;
  double grad_clip = 1.0;
  GroupRule groups = GroupRule::rwkvx;

  bool recompute = false;
  // Where the steps run: "cpu" or "cuda" (a GPU build; without a usable GPU the run falls back to the CPU
  // and says so). bf16: on CUDA, dense products with bf16 operands and fp32 accumulation (false: fp32).
  std::string device = "cpu";
  bool bf16 = true;
  uint64_t seed = 1;
  int64_t threads = 1;             // threads of the whole run
  int64_t parallel_sequences = 1;  // sequences trained at once (each on its own model copy), ≤ threads
  // Sparse attention; 0: the starting model's rwkvx.chunk_size / rwkvx.top_k metadata, else 2048 / 3.
  int chunk_size = 0, top_k = 0;

  int64_t save_every = 0;  // steps between checkpoints (0: only the final one)
  bool save_pth = true, save_safetensors = false;
  DType save_dtype = DType::bf16;
  int64_t keep_states = 2;  // training states kept in out_dir (older ones are removed); 0 = keep all
  int64_t log_every = 10;   // progress line interval when stderr is not a terminal
};

// Parses `text` (the contents of `source`). Throws rwkvx::Error "<source>: key '<k>': ..." for a bad
// value, "<source>: unknown key '<k>'" for a key that does not exist, and names missing required keys.
TrainConfig parse_train_config(const std::string& text, const std::string& source);
// Reads and parses a config file.
TrainConfig load_train_config(const std::string& path);

// The values that decide the training trajectory, as JSON text per key: a resume compares them with the
// run it continues (steps, saving, logging, threads and parallel_sequences may change; these may not).
std::vector<std::pair<std::string, std::string>> trajectory_keys(const TrainConfig& c);

}  // namespace rwkvx::train
