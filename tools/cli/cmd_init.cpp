// `rwkvx init`: writes a random-weight checkpoint with real shapes and the official tensor names, for
// benchmarks and tests (it loads in every command, and in the official Python code).
#include <CLI/CLI.hpp>
#include <cstdio>

#include "commands.h"
#include "model/random_init.h"

void register_init_commands(CLI::App& app) {
  using namespace rwkvx;
  static std::string preset, out, dtype = "bf16";
  static uint64_t seed = 1;
  std::string help = "write a random-weight model with real shapes (.safetensors). Presets:";
  for (const ModelPreset& p : model_presets()) help += std::string("\n  ") + p.name + ": " + p.description;
  CLI::App* cmd = app.add_subcommand("init", help);
  cmd->add_option("--preset", preset, "model shape preset (see above)")->required();
  cmd->add_option("--out", out, "output .safetensors file (written atomically)")->required();
  cmd->add_option("--seed", seed, "random seed (same seed, same file on every platform)")->default_val(1);
  cmd->add_option("--dtype", dtype, "stored precision")->check(CLI::IsMember({"bf16", "f32"}))->default_val("bf16");
  cmd->callback([] {
    RandomModelSpec spec = find_preset(preset);
    spec.seed = seed;
    spec.dtype = dtype == "f32" ? DType::f32 : DType::bf16;
    std::vector<TensorData> tensors = make_random_model(spec);
    int64_t params = 0;
    for (const TensorData& t : tensors) params += int64_t(t.bytes.size() / dtype_size(t.dtype));
    save_safetensors(out, tensors);
    std::printf("wrote %s: preset %s, %lld parameters, %s, seed %llu\n", out.c_str(), preset.c_str(),
                static_cast<long long>(params), dtype.c_str(), static_cast<unsigned long long>(seed));
  });
}
