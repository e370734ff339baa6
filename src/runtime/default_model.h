// The default model: the small trained RWKV-X shipped in data/models/ (see its README and the main
// README's model card), used by the model commands when --model is omitted.
#pragma once
#include <string>

namespace rwkvx {

inline constexpr const char* kDefaultModelFile = "rwkvx-default.safetensors";

// $RWKVX_MODEL if set, else data/models/rwkvx-default.safetensors found relative to the binary
// (<bin>/../data/models/, <bin>/../share/rwkvx/models/) or in the source tree. Returns the last candidate
// when none exists (the loader's error then names it).
std::string default_model_path();

}  // namespace rwkvx
