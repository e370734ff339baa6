#include "model/formats/tensor_store.h"

#include "core/error.h"

namespace rwkvx {

int64_t StoredTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string StoredTensor::shape_str() const { return shape_to_string(shape); }

std::vector<float> StoredTensor::to_f32() const {
  std::vector<float> out(static_cast<size_t>(numel()));
  // An empty tensor has no buffer: out.data() may be null, and memcpy(nullptr, _, 0) is undefined.
  if (!out.empty()) convert_to_f32(dtype, data, out.data(), out.size());
  return out;
}

void TensorStore::share_ownership() {
  struct KeepAlive {
    std::shared_ptr<const MappedFile> file;
    std::vector<std::shared_ptr<std::vector<uint8_t>>> owned;
  };
  auto keep = std::make_shared<const KeepAlive>(KeepAlive{file, owned});
  for (auto& [name, t] : tensors) t.owner = keep;
}

const StoredTensor* TensorStore::find(const std::string& name) const {
  auto it = tensors.find(name);
  return it == tensors.end() ? nullptr : &it->second;
}

const StoredTensor& TensorStore::get(const std::string& name) const {
  const StoredTensor* t = find(name);
  if (!t) throw Error(path + ": missing tensor '" + name + "'");
  return *t;
}

TensorStore load_checkpoint(const std::string& path) {
  auto file = MappedFile::open(path);
  if (file->size() >= 4 && file->data()[0] == 'P' && file->data()[1] == 'K') return parse_pth(std::move(file));
  return parse_safetensors(std::move(file));
}

}  // namespace rwkvx
