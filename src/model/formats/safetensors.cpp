// .safetensors reader (spec model.md §1.2): u64 header length, JSON header, raw data. Every field the
// header states is checked against the file (dtype, shape × dtype size = byte range, ranges in bounds
// and disjoint) before any tensor is exposed.
#include <algorithm>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/formats/tensor_store.h"

namespace rwkvx {

TensorStore parse_safetensors(std::shared_ptr<const MappedFile> file) {
  const std::string& path = file->path();
  if (file->size() < 8) throw Error(path + ": too short for a safetensors header (" + std::to_string(file->size()) + " bytes)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | file->data()[i];
  if (n > file->size() - 8 || n > (uint64_t(100) << 20))
    throw Error(path + ": safetensors header length " + std::to_string(n) + " exceeds the file (" +
                std::to_string(file->size()) + " bytes); not a safetensors file or truncated");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(file->data() + 8, file->data() + 8 + n);
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": safetensors header is not valid JSON: " + e.what());
  }
  if (!header.is_object()) throw Error(path + ": safetensors header is not a JSON object");
  const uint8_t* data = file->data() + 8 + n;
  const uint64_t data_size = file->size() - 8 - n;

  TensorStore store;
  store.path = path;
  store.format = "safetensors";
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& item : header.items()) {
    // Not a structured binding: clang 14 (the fuzz build) cannot capture one in the lambda below.
    const std::string& name = item.key();
    const nlohmann::json& info = item.value();
    if (name == "__metadata__") {
      // The format's metadata is a string → string map; other values are ignored, never dumped.
      if (info.is_object())
        for (const auto& m : info.items())
          if (m.value().is_string()) store.metadata[m.key()] = m.value().get<std::string>();
      continue;
    }
    auto fail = [&](const std::string& msg) { throw Error(path + ": tensor '" + name + "': " + msg); };
    if (!info.is_object()) fail("header entry is not an object");
    if (!info.contains("dtype") || !info["dtype"].is_string()) fail("missing or non-string 'dtype'");
    std::string dts = info["dtype"].get<std::string>();
    StoredTensor t;
    t.name = name;
    if (dts == "F32") t.dtype = DType::f32;
    else if (dts == "F16") t.dtype = DType::f16;
    else if (dts == "BF16") t.dtype = DType::bf16;
    else fail("unsupported dtype '" + dts + "' (supported: F32, F16, BF16)");
    if (!info.contains("shape") || !info["shape"].is_array()) fail("missing or non-array 'shape'");
    uint64_t numel = 1, nonzero = 1;  // nonzero: product of the non-zero entries, bounded even if one is 0
    for (const auto& d : info["shape"]) {
      // Only scalars are printed: dump() of a deeply nested array recurses and overflows the stack.
      if (!d.is_number_unsigned())
        fail("shape entry " + (d.is_primitive() ? d.dump().substr(0, 40) : "of type " + std::string(d.type_name())) +
             " is not a non-negative integer");
      uint64_t v = d.get<uint64_t>();
      if (v != 0 && nonzero > (uint64_t(1) << 40) / v) fail("shape too large");
      if (v != 0) nonzero *= v;
      numel *= v;
      t.shape.push_back(int64_t(v));
    }
    const auto& off = info.contains("data_offsets") ? info["data_offsets"] : nlohmann::json();
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail("'data_offsets' must be [begin, end] non-negative integers");
    uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    if (b > e || e > data_size)
      fail("data_offsets [" + std::to_string(b) + ", " + std::to_string(e) + "] outside the data section (" +
           std::to_string(data_size) + " bytes)");
    if (e - b != numel * dtype_size(t.dtype))
      fail("byte range of " + std::to_string(e - b) + " bytes does not match shape " + shape_to_string(t.shape) +
           " of " + std::string(dtype_name(t.dtype)) + " (" + std::to_string(numel * dtype_size(t.dtype)) + " bytes)");
    t.data = data + b;
    ranges.emplace_back(b, e);
    store.tensors.emplace(name, std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) {
      std::string a, b2;
      for (const auto& [nm, t] : store.tensors) {
        uint64_t tb = uint64_t(t.data - data);
        if (tb == ranges[i - 1].first && t.nbytes() > 0) a = nm;
        if (tb == ranges[i].first && t.nbytes() > 0) b2 = nm;
      }
      throw Error(path + ": tensors '" + a + "' and '" + b2 + "' overlap in the data section");
    }
  }
  store.file = std::move(file);
  store.share_ownership();
  return store;
}

}  // namespace rwkvx
