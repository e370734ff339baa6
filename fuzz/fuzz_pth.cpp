// libFuzzer target for the .pth reader (zip directory + restricted unpickler + tensor rebuilding,
// src/model/formats/{zip_reader,pickle,pth}.cpp) and, on success, the configuration inference
// (src/model/config.cpp). Every tensor's bytes are read through to_f32 so that ASan catches a tensor
// pointing outside the file. Only rwkvx::Error may escape the parser; anything else is a finding.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "core/mapped_file.h"
#include "fuzz_common.h"
#include "model/config.h"
#include "model/formats/tensor_store.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = rwkvx::MappedFile::from_bytes("fuzz.pth", std::vector<uint8_t>(data, data + size));
  try {
    rwkvx::TensorStore store = rwkvx::parse_pth(file);
    rwkvx::fuzz::touch_all_tensors(store);
    (void)rwkvx::infer_config(store, rwkvx::ModelOptions{});
  } catch (const rwkvx::Error&) {
  }
  return 0;
}
