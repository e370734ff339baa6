// Writes .safetensors files (spec model.md §1.2): used by `rwkvx init`, tests and converters.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace rwkvx {

struct TensorData {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // little-endian, row-major
};

// String → string pairs stored under the header's "__metadata__" key (omitted when empty). rwkvx writes
// `rwkvx.chunk_size` and `rwkvx.top_k` for RWKV-X models (see checkpoint_metadata.h).
using SafetensorsMetadata = std::map<std::string, std::string>;

// The whole file as bytes: header (names sorted, offsets contiguous, 8-byte aligned data) + data.
std::vector<uint8_t> serialize_safetensors(const std::vector<TensorData>& tensors,
                                           const SafetensorsMetadata& metadata = {});
// Writes atomically (temp file, fsync, rename).
void save_safetensors(const std::string& path, const std::vector<TensorData>& tensors,
                      const SafetensorsMetadata& metadata = {});

// fp32 values stored as `dtype` (bf16 rounds to nearest even; f16 is not written).
TensorData make_tensor_data(std::string name, DType dtype, std::vector<int64_t> shape, const std::vector<float>& v);

}  // namespace rwkvx
