// Model options shared by every command that loads a model (info, logits, generate, chat, serve):
// the checkpoint path and the load-time options that checkpoints do not store (chunk size, top-k,
// KV eviction), plus --device where a command runs the model.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"

namespace CLI {
class App;
}

namespace rwkvx {

struct ModelArgs {
  std::string path;
  ModelOptions options;
  std::string device = "cpu";
  bool int8 = false;  // --int8: Linear weights quantized to int8 at load (fast CPU backend)
};

// --model, --chunk-size, --top-k, --kv-evict-max, --kv-evict-window, --kv-evict-keep.
void add_model_args(CLI::App* cmd, ModelArgs& a);
// Whitespace-separated token ids from a file (--tokens-file, --prompt-tokens); a non-integer or negative
// entry is an rwkvx::Error naming the file and the entry's index.
std::vector<int32_t> read_token_ids(const std::string& path);
// Comma-separated token counts with binary K/M suffixes ("4096,64K,1M": 1M = 1048576), for --prefill and
// --tokens; a malformed or non-positive entry is an rwkvx::Error naming `opt` and the entry.
std::vector<int64_t> parse_token_counts(const std::string& opt, const std::string& s);
// --device cpu|reference|cuda and --int8 (commands that run the model).
void add_device_arg(CLI::App* cmd, ModelArgs& a);

}  // namespace rwkvx
