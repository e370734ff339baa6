// `rwkvx init`: writes a random-weight checkpoint with real shapes and the official tensor names, for
// benchmarks and tests (it loads in every command, and in the official Python code).
#include <CLI/CLI.hpp>
#include <cstdio>

#include "commands.h"
#include "core/error.h"
#include "model/random_init.h"

void register_init_commands(CLI::App& app) {
  using namespace rwkvx;
  static std::string preset, out, dtype = "bf16";
  static uint64_t seed = 1;
  static int64_t n_layer = 0, n_embd = 0;
  static std::string init = "test";
  std::string help = "write a random-weight model with real shapes (.safetensors). Presets:";
  for (const ModelPreset& p : model_presets()) help += std::string("\n  ") + p.name + ": " + p.description;
  CLI::App* cmd = app.add_subcommand("init", help);
  cmd->add_option("--preset", preset, "model shape preset (see above)")->required();
  cmd->add_option("--out", out, "output .safetensors file (written atomically)")->required();
  cmd->add_option("--seed", seed, "random seed (same seed, same file on every platform)")->default_val(1);
  cmd->add_option("--dtype", dtype, "stored precision")->check(CLI::IsMember({"bf16", "f32"}))->default_val("bf16");
  cmd->add_option("--n-layer", n_layer, "override the preset's number of RWKV blocks")->check(CLI::PositiveNumber);
  cmd->add_option("--n-embd", n_embd,
                  "override the preset's width (a multiple of 64; the low-rank widths follow RWKV-7's formulas)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--init", init,
                  "test: values for tests and benchmarks (every tensor non-zero); rwkv7: the official RWKV-7 training "
                  "init (zero output projections, orthogonal head, ...), to train from scratch")
      ->check(CLI::IsMember({"test", "rwkv7"}))
      ->default_val("test");
  cmd->callback([] {
    RandomModelSpec spec = find_preset(preset);
    if (n_layer > 0) spec.n_rwkv = n_layer;
    if (n_embd > 0) {
      if (n_embd % spec.head_size != 0)
        throw Error("--n-embd " + std::to_string(n_embd) + " is not a multiple of the head size " +
                    std::to_string(spec.head_size));
      spec.n_embd = n_embd;
      rwkv7_lora_dims(n_embd, spec);
    }
    spec.train_init = init == "rwkv7";
    spec.seed = seed;
    spec.dtype = dtype == "f32" ? DType::f32 : DType::bf16;
    std::vector<TensorData> tensors = make_random_model(spec);
    int64_t params = 0;
    for (const TensorData& t : tensors) params += int64_t(t.bytes.size() / dtype_size(t.dtype));
    save_safetensors(out, tensors);
    std::printf("wrote %s: preset %s (%lld RWKV blocks, width %lld), init %s, %lld parameters, %s, seed %llu\n",
                out.c_str(), preset.c_str(), static_cast<long long>(spec.n_rwkv), static_cast<long long>(spec.n_embd),
                init.c_str(), static_cast<long long>(params), dtype.c_str(), static_cast<unsigned long long>(seed));
  });
}
