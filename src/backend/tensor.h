// Tensor: a typed, shaped view of memory owned by a backend (host memory for the CPU backends, device
// memory for CUDA). Up to 4 dimensions, row-major, contiguous. Copying a Tensor copies the view and
// shares the storage.
#pragma once
#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>

#include "core/dtype.h"
#include "core/error.h"

namespace rwkvx {

enum class Device : uint8_t { cpu, cuda };

struct Tensor {
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int ndim = 0;
  std::array<int64_t, 4> shape{};
  void* data = nullptr;
  std::shared_ptr<const void> storage;  // keeps `data` alive (backend memory, or a mapped checkpoint)
  const float* scales = nullptr;        // q8 only: one fp32 scale per row, kept alive by `storage`

  bool empty() const { return data == nullptr; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  int64_t rows() const { return ndim == 0 ? 1 : shape[0]; }
  int64_t row_size() const { return ndim == 0 ? 1 : numel() / shape[0]; }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  std::string shape_str() const;

  // Host fp32 access (CPU backends only).
  float* f32() const {
    RWKVX_ASSERT(dtype == DType::f32 && device == Device::cpu, "f32() on a non-host or non-f32 tensor");
    return static_cast<float*>(data);
  }
  // View of rows [r0, r0 + n) along dimension 0.
  Tensor rows_view(int64_t r0, int64_t n) const;
  // Same memory, new shape (numel must match).
  Tensor reshaped(std::initializer_list<int64_t> dims) const;
};

}  // namespace rwkvx
