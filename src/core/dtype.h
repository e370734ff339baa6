// Element types of stored tensors and their exact conversion to fp32.
#pragma once
#include <cstdint>
#include <cstring>
#include <string_view>

namespace rwkvx {

// q8: int8 weights with one fp32 scale per row (value = scale[row] * q), produced by the CPU backend's
// optional weight quantization; never found in checkpoint files.
// bf16x2: fp32 activations as two bf16 halves per value, each row of K values stored [hi (K) | lo (K)] with
// hi = bf16(x), lo = bf16(x - hi): the operand form of the CUDA backend's split GEMMs, written directly by
// the ops that produce GEMM inputs (Backend::gemm_input_dtype); never in files. Its size is one fp32.
enum class DType : uint8_t { f32, f16, bf16, q8, bf16x2 };

constexpr size_t dtype_size(DType t) {
  return t == DType::f32 || t == DType::bf16x2 ? 4 : t == DType::q8 ? 1 : 2;
}
constexpr std::string_view dtype_name(DType t) {
  return t == DType::f32    ? "f32"
         : t == DType::f16  ? "f16"
         : t == DType::bf16 ? "bf16"
         : t == DType::q8   ? "q8"
                            : "bf16x2";
}

// bf16 is the upper half of an fp32: the conversion is exact.
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE binary16 -> binary32, exact for every input (subnormals, inf, nan included).
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400) == 0);
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even fp32 -> bf16 (used when writing bf16 files and by tests).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return uint16_t((u >> 16) | 0x40);  // quiet nan
  u += 0x7fff + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}

// Converts n elements of type `t` at `src` (any alignment) to fp32.
void convert_to_f32(DType t, const void* src, float* dst, size_t n);

}  // namespace rwkvx
