// Shared by the checkpoint fuzz targets: reads every tensor's bytes through to_f32, so ASan catches a
// tensor that points outside its file, and keeps the result alive so the reads are not optimised away.
#pragma once
#include <cstddef>
#include <vector>

#include "model/formats/tensor_store.h"

namespace rwkvx::fuzz {

inline volatile float g_sink;

inline void touch_all_tensors(const TensorStore& store) {
  float acc = 0;
  for (const auto& [name, t] : store.tensors) {
    const std::vector<float> v = t.to_f32();
    if (v.size() != size_t(t.numel())) __builtin_trap();
    for (float x : v) acc += x;
  }
  g_sink = acc;
}

}  // namespace rwkvx::fuzz
