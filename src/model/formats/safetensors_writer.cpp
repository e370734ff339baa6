#include "model/formats/safetensors_writer.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"

namespace rwkvx {

namespace {

// Header bytes (length prefix included) and the tensors in file order.
std::vector<uint8_t> make_header(const std::vector<TensorData>& tensors, const SafetensorsMetadata& metadata,
                                 std::vector<const TensorData*>& order) {
  for (const TensorData& t : tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->name < b->name; });
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  uint64_t off = 0;
  for (const TensorData* t : order) {
    const char* dt = t->dtype == DType::f32 ? "F32" : t->dtype == DType::f16 ? "F16" : "BF16";
    header[t->name] = {{"dtype", dt}, {"shape", t->shape}, {"data_offsets", {off, off + t->bytes.size()}}};
    off += t->bytes.size();
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // keep the data section 8-byte aligned
  std::vector<uint8_t> out(8 + h.size());
  const uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out[size_t(i)] = uint8_t(n >> (8 * i));
  std::memcpy(out.data() + 8, h.data(), h.size());
  return out;
}

}  // namespace

std::vector<uint8_t> serialize_safetensors(const std::vector<TensorData>& tensors, const SafetensorsMetadata& metadata) {
  std::vector<const TensorData*> order;
  std::vector<uint8_t> out = make_header(tensors, metadata, order);
  for (const TensorData* t : order) out.insert(out.end(), t->bytes.begin(), t->bytes.end());
  return out;
}

void save_safetensors(const std::string& path, const std::vector<TensorData>& tensors,
                      const SafetensorsMetadata& metadata) {
  std::vector<const TensorData*> order;
  std::vector<uint8_t> header = make_header(tensors, metadata, order);
  AtomicFile f(path);
  f.write(header.data(), header.size());
  for (const TensorData* t : order) f.write(t->bytes.data(), t->bytes.size());
  f.commit();
}

TensorData make_tensor_data(std::string name, DType dtype, std::vector<int64_t> shape, const std::vector<float>& v) {
  TensorData t{std::move(name), dtype, std::move(shape), {}};
  if (dtype == DType::f32) {
    t.bytes.resize(v.size() * 4);
    std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  } else {
    RWKVX_ASSERT(dtype == DType::bf16, "make_tensor_data: f16 output not supported");
    t.bytes.resize(v.size() * 2);
    for (size_t i = 0; i < v.size(); ++i) {
      uint16_t h = f32_to_bf16(v[i]);
      std::memcpy(t.bytes.data() + 2 * i, &h, 2);
    }
  }
  return t;
}

}  // namespace rwkvx
