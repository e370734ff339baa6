// Dense products of the CUDA trainer through cuBLAS (train ops linear.h: `linear` takes W [out, in] as
// torch Linear, `matmul` takes W [in, out]), row-major like the CPU ops. Precision:
//   double                 cublasDgemm (the fp64 gradient checks);
//   float, exact           cublasSgemm without TF32 (the fp32 reference of the GPU path);
//   float, bf16 (default)  both operands rounded to bf16, fp32 accumulation and output (cublasGemmEx):
//                          the mixed precision of the official trainer; master weights stay fp32.
// Backward functions ADD into their outputs (β = 1); a null output is skipped.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace rwkvx::train::cuda {

class Gemm {
 public:
  Gemm(cudaStream_t st, bool bf16);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;
  bool bf16() const { return bf16_; }

  // C[M, N] (+)= op(A) · op(B), row-major; ta: A stored [K, M]; tb: B stored [N, K].
  template <class S>
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const S* A, int64_t lda, const S* B, int64_t ldb, S* C,
            int64_t ldc, bool accumulate);

  // y[T, out] = x @ Wᵀ;  dx += dy @ W;  dW += dyᵀ @ x.
  template <class S>
  void linear_forward(const S* x, const S* W, S* y, int64_t T, int64_t in, int64_t out) {
    gemm(false, true, T, out, in, x, in, W, in, y, out, false);
  }
  template <class S>
  void linear_backward(const S* dy, const S* x, const S* W, S* dx, S* dW, int64_t T, int64_t in, int64_t out) {
    if (dx) gemm(false, false, T, in, out, dy, out, W, in, dx, in, true);
    if (dW) gemm(true, false, out, in, T, dy, out, x, in, dW, in, true);
  }
  // y[T, out] = x @ W (W [in, out]);  dx += dy @ Wᵀ;  dW += xᵀ @ dy.
  template <class S>
  void matmul_forward(const S* x, const S* W, S* y, int64_t T, int64_t in, int64_t out) {
    gemm(false, false, T, out, in, x, in, W, out, y, out, false);
  }
  template <class S>
  void matmul_backward(const S* dy, const S* x, const S* W, S* dx, S* dW, int64_t T, int64_t in, int64_t out) {
    if (dx) gemm(false, true, T, in, out, dy, out, W, out, dx, in, true);
    if (dW) gemm(true, false, in, out, T, x, in, dy, out, dW, out, true);
  }

 private:
  // bf16 copies of the two operands of the current product (grown, never shrunk).
  void* stage(int which, int64_t elems);
  cudaStream_t st_;
  cublasHandle_t handle_ = nullptr;
  bool bf16_;
  void* buf_[2] = {nullptr, nullptr};
  int64_t cap_[2] = {0, 0};
};

}  // namespace rwkvx::train::cuda
