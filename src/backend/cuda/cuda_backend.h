// The CUDA backend (built with -DRWKVX_CUDA=ON): tensors in device memory, GEMMs through cuBLASLt, fused
// RWKV-7 and sparse-attention kernels. See cuda_internal.h for the class and the file layout.
#pragma once
#include <memory>
#include <string>

#include "backend/ops.h"

namespace rwkvx {

// True when a CUDA device can be used; otherwise false and `why` (if given) says what is missing.
bool cuda_device_available(std::string* why = nullptr);
// The CUDA backend on `device`. Throws rwkvx::Error when no device can be used.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);

}  // namespace rwkvx
