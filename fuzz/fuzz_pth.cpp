// libFuzzer target for the .pth reader (zip directory + restricted unpickler + tensor rebuilding,
// src/model/formats/{zip_reader,pickle,pth}.cpp) and, on success, the configuration inference
// (src/model/config.cpp). Every tensor's bytes are read through to_f32 so that ASan catches a tensor
// pointing outside the file. Only rwkvx::Error may escape the parser; anything else is a finding.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "core/mapped_file.h"
#include "model/config.h"
#include "model/formats/tensor_store.h"

namespace {

volatile float g_sink;

void touch_all(const rwkvx::TensorStore& store) {
  float acc = 0;
  for (const auto& [name, t] : store.tensors) {
    const std::vector<float> v = t.to_f32();
    if (v.size() != size_t(t.numel())) __builtin_trap();
    for (float x : v) acc += x;
  }
  g_sink = acc;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = rwkvx::MappedFile::from_bytes("fuzz.pth", std::vector<uint8_t>(data, data + size));
  try {
    rwkvx::TensorStore store = rwkvx::parse_pth(file);
    touch_all(store);
    (void)rwkvx::infer_config(store, rwkvx::ModelOptions{});
  } catch (const rwkvx::Error&) {
  }
  return 0;
}
