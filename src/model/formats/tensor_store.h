// A checkpoint as a read-only map name -> stored tensor (dtype, shape, bytes), independent of the file
// format and of any compute backend. Data points into the memory-mapped file whenever the layout allows
// (contiguous tensors); strided ones are materialised. spec model.md §1.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/mapped_file.h"

namespace rwkvx {

struct StoredTensor {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // contiguous row-major little-endian; alignment not guaranteed
  std::shared_ptr<const void> owner;  // keeps `data` alive (the mapped file or a materialised copy)
  int64_t numel() const;
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  std::string shape_str() const;
  // Copies the values to fp32 (exact for bf16/fp16).
  std::vector<float> to_f32() const;
};

class TensorStore {
 public:
  std::string path;  // for error messages
  std::string format;  // "pth" or "safetensors"
  std::map<std::string, StoredTensor> tensors;
  // safetensors "__metadata__": its string values (others are ignored); empty for .pth files.
  std::map<std::string, std::string> metadata;

  const StoredTensor* find(const std::string& name) const;
  // Throws rwkvx::Error "<path>: missing tensor '<name>'".
  const StoredTensor& get(const std::string& name) const;

  // Keeps the bytes alive (mapped file, materialised strided tensors).
  std::shared_ptr<const MappedFile> file;
  std::vector<std::shared_ptr<std::vector<uint8_t>>> owned;
  // Sets every tensor's `owner` to one handle on the file and the materialised copies, so a backend can
  // keep zero-copy views after the store is gone. Parsers call it last.
  void share_ownership();
};

// Parsers over a whole file's bytes. `file` is kept alive by the returned store.
TensorStore parse_pth(std::shared_ptr<const MappedFile> file);
TensorStore parse_safetensors(std::shared_ptr<const MappedFile> file);
// Opens `path` and picks the parser from the content (zip magic -> .pth, else safetensors).
TensorStore load_checkpoint(const std::string& path);

std::string shape_to_string(const std::vector<int64_t>& shape);

}  // namespace rwkvx
