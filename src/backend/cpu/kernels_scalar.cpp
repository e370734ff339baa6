// The scalar instantiation of kernels_impl.h (compile flags set in CMakeLists.txt).
#define RWKVX_KERNEL_ISA 0
#include "backend/cpu/kernels_impl.h"

namespace rwkvx::cpu {

const Kernels& scalar_kernels() {
  static const Kernels k = RWKVX_ISA_NS::make_kernels();
  return k;
}

}  // namespace rwkvx::cpu
