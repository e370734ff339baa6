// cuBLAS products of the CUDA trainer (gemm_cuda.h).
#include "train/cuda/gemm_cuda.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "train/cuda/device_array.h"

namespace rwkvx::train::cuda {

void throw_train_cuda_error(const char* what, const char* file, int line, cudaError_t err) {
  throw Error(std::string("CUDA training: ") + what + " failed at " + file + ":" + std::to_string(line) + ": " +
              cudaGetErrorString(err));
}

namespace {

void check_blas(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("CUDA training: ") + what + " failed (cuBLAS status " + std::to_string(int(st)) + ")");
}

// dst[r, c] = bf16(src[r, c]); src row stride ld, dst contiguous.
__global__ void to_bf16_kernel(const float* __restrict__ src, int64_t ld, __nv_bfloat16* __restrict__ dst,
                               int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    dst[i] = __float2bfloat16_rn(src[r * ld + c]);
  }
}

}  // namespace

Gemm::Gemm(cudaStream_t st, bool bf16) : st_(st), bf16_(bf16) {
  check_blas(cublasCreate(&handle_), "cublasCreate");
  check_blas(cublasSetStream(handle_, st), "cublasSetStream");
  // Default math: cublasSgemm stays fp32 (TF32 only with CUBLAS_TF32_TENSOR_OP_MATH), bf16 uses tensor cores.
  check_blas(cublasSetMathMode(handle_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
}

Gemm::~Gemm() {
  for (void* b : buf_)
    if (b) cudaFreeAsync(b, st_);
  if (handle_) cublasDestroy(handle_);
}

void* Gemm::stage(int which, int64_t elems) {
  if (cap_[which] < elems) {
    if (buf_[which]) RWKVX_TRAIN_CUDA_CHECK(cudaFreeAsync(buf_[which], st_));
    buf_[which] = nullptr;
    RWKVX_TRAIN_CUDA_CHECK(cudaMallocAsync(&buf_[which], size_t(elems) * sizeof(__nv_bfloat16), st_));
    cap_[which] = elems;
  }
  return buf_[which];
}

template <class S>
void Gemm::gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const S* A, int64_t lda, const S* B, int64_t ldb,
                S* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  const S alpha = 1, beta = accumulate ? 1 : 0;
  // Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ: swap the operands.
  const cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  if constexpr (std::is_same_v<S, double>) {
    check_blas(cublasDgemm(handle_, opb, opa, int(N), int(M), int(K), &alpha, B, int(ldb), A, int(lda), &beta, C,
                           int(ldc)),
               "cublasDgemm");
  } else if (!bf16_) {
    check_blas(cublasSgemm(handle_, opb, opa, int(N), int(M), int(K), &alpha, B, int(ldb), A, int(lda), &beta, C,
                           int(ldc)),
               "cublasSgemm");
  } else {
    const int64_t ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
    auto* a16 = static_cast<__nv_bfloat16*>(stage(0, ar * ac));
    auto* b16 = static_cast<__nv_bfloat16*>(stage(1, br * bc));
    const int threads = 256;
    auto blocks = [&](int64_t n) { return int(std::min<int64_t>((n + threads - 1) / threads, 8192)); };
    to_bf16_kernel<<<blocks(ar * ac), threads, 0, st_>>>(A, lda, a16, ar, ac);
    RWKVX_TRAIN_CUDA_CHECK(cudaGetLastError());
    to_bf16_kernel<<<blocks(br * bc), threads, 0, st_>>>(B, ldb, b16, br, bc);
    RWKVX_TRAIN_CUDA_CHECK(cudaGetLastError());
    const float fa = 1.0f, fb = accumulate ? 1.0f : 0.0f;
    check_blas(cublasGemmEx(handle_, opb, opa, int(N), int(M), int(K), &fa, b16, CUDA_R_16BF, int(bc), a16,
                            CUDA_R_16BF, int(ac), &fb, C, CUDA_R_32F, int(ldc), CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx (bf16)");
  }
}

template void Gemm::gemm<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                                float*, int64_t, bool);
template void Gemm::gemm<double>(bool, bool, int64_t, int64_t, int64_t, const double*, int64_t, const double*, int64_t,
                                 double*, int64_t, bool);

}  // namespace rwkvx::train::cuda
