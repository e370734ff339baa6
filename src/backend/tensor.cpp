#include "backend/tensor.h"

namespace rwkvx {

std::string Tensor::shape_str() const {
  std::string s = "[";
  for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

Tensor Tensor::rows_view(int64_t r0, int64_t n) const {
  RWKVX_ASSERT(ndim >= 1 && r0 >= 0 && n >= 0 && r0 + n <= shape[0], "rows_view out of range");
  Tensor t = *this;
  t.shape[0] = n;
  t.data = static_cast<char*>(data) + size_t(r0 * row_size()) * dtype_size(dtype);
  return t;
}

Tensor Tensor::reshaped(std::initializer_list<int64_t> dims) const {
  Tensor t = *this;
  t.ndim = int(dims.size());
  RWKVX_ASSERT(t.ndim <= 4, "too many dimensions");
  int i = 0;
  for (int64_t d : dims) t.shape[i++] = d;
  RWKVX_ASSERT(t.numel() == numel(), "reshape changes the element count");
  return t;
}

}  // namespace rwkvx
