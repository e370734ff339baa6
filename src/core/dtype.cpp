#include "core/dtype.h"

namespace rwkvx {

void convert_to_f32(DType t, const void* src, float* dst, size_t n) {
  if (n == 0) return;
  const auto* p = static_cast<const unsigned char*>(src);
  switch (t) {
    case DType::q8:      // needs per-row scales: not a plain element type
    case DType::bf16x2:  // row-structured device operand form: never converted here
      break;
    case DType::f32:
      std::memcpy(dst, p, n * 4);
      return;
    case DType::bf16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        dst[i] = bf16_to_f32(h);
      }
      return;
    case DType::f16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        dst[i] = f16_to_f32(h);
      }
      return;
  }
}

}  // namespace rwkvx
