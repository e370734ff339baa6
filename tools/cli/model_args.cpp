// The shared model options of the CLI (see model_args.h).
#include "model_args.h"

#include <CLI/CLI.hpp>
#include <climits>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/parse.h"
#include "runtime/default_model.h"

namespace rwkvx {

void add_model_args(CLI::App* cmd, ModelArgs& a) {
  cmd->add_option("--model,-m", a.path,
                  "checkpoint (.pth or .safetensors); default: the shipped model data/models/rwkvx-default.safetensors "
                  "(or $RWKVX_MODEL)")
      ->default_str(default_model_path());
  if (a.path.empty()) a.path = default_model_path();
  // 0 in ModelOptions means "the checkpoint's value"; a given value must be >= 1 (one-line error).
  auto positive = [](const char* name, int& dst) {
    return [name, &dst](const int& v) {
      if (v < 1) throw Error(std::string("option ") + name + " must be >= 1 (got " + std::to_string(v) + ")");
      dst = v;
    };
  };
  cmd->add_option_function<int>("--chunk-size", positive("--chunk-size", a.options.chunk),
                                "sparse-attention chunk size (default: the checkpoint's rwkvx.chunk_size metadata, "
                                "else 2048)");
  cmd->add_option_function<int>("--top-k", positive("--top-k", a.options.top_k),
                                "chunks attended per query, own chunk included (default: the checkpoint's "
                                "rwkvx.top_k, else 3)");
  cmd->add_option("--kv-evict-max", a.options.eviction.max_len,
                  "official bounded KV cache: evict when a cache exceeds this many rows (0 = off, exact)")
      ->default_val(0);
  cmd->add_option("--kv-evict-window", a.options.eviction.window, "eviction: newest rows always kept")
      ->default_val(2000);
  cmd->add_option("--kv-evict-keep", a.options.eviction.min_len, "eviction: rows kept after eviction")
      ->default_val(16000);
  cmd->add_option_function<std::string>(
         "--kv-dtype",
         [&a](const std::string& v) {
           if (v == "f32") a.options.kv_dtype = DType::f32;
           else if (v == "bf16") a.options.kv_dtype = DType::bf16;
           else throw CLI::ValidationError("--kv-dtype", "expected f32 or bf16, got '" + v + "'");
         },
         "sparse-attention KV cache precision: f32 (exact, default) or bf16 (half the memory)")
      ->default_str("f32");
}

void add_device_arg(CLI::App* cmd, ModelArgs& a) {
  cmd->add_option("--device", a.device, "cpu (fast CPU backend), cuda (GPU; falls back to cpu without one) or reference (fp32 oracle loops, slow)")
      ->default_val("cpu");
  cmd->add_flag("--int8", a.int8,
                "quantize Linear weights to int8 at load (one scale per output channel; decode also quantizes "
                "activations per block of 64); see `rwkvx quality` for its cost");
}



std::vector<int64_t> parse_token_counts(const std::string& opt, const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    int64_t mult = 1;
    if (item.back() == 'K' || item.back() == 'k') mult = 1024, item.pop_back();
    else if (item.back() == 'M' || item.back() == 'm') mult = 1024 * 1024, item.pop_back();
    size_t used = 0;
    const long long v = leading_integer(item, used);
    if (used != item.size() || v <= 0) throw Error(opt + ": '" + item + "' is not a positive length (e.g. 4096 or 64K)");
    out.push_back(v * mult);
  }
  return out;
}

std::vector<int32_t> read_token_ids(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error(path + ": cannot open token file");
  std::vector<int32_t> ids;
  std::string word;
  while (in >> word) {
    size_t used = 0;
    const long long v = leading_integer(word, used);
    if (used != word.size() || v < 0 || v > INT32_MAX)
      throw Error(path + ": token " + std::to_string(ids.size()) + " ('" + word.substr(0, 32) +
                  "') is not a non-negative integer id");
    ids.push_back(int32_t(v));
  }
  return ids;
}

}  // namespace rwkvx
