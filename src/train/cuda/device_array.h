// A typed device allocation owned like a std::vector (move-only), for the CUDA trainer's parameters,
// gradients and saved activations. Allocation is stream-ordered (cudaMallocAsync) so freeing saved
// activations during the backward does not synchronise the device.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"

namespace rwkvx::train::cuda {

[[noreturn]] void throw_train_cuda_error(const char* what, const char* file, int line, cudaError_t err);

#define RWKVX_TRAIN_CUDA_CHECK(expr)                                                               \
  do {                                                                                             \
    cudaError_t e_ = (expr);                                                                       \
    if (e_ != cudaSuccess) ::rwkvx::train::cuda::throw_train_cuda_error(#expr, __FILE__, __LINE__, e_); \
  } while (0)

template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(int64_t n, cudaStream_t st) { reset(n, st); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept { swap(o); }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      release();
      swap(o);
    }
    return *this;
  }
  ~DeviceArray() { release(); }

  // n uninitialised elements (the previous allocation is freed first).
  void reset(int64_t n, cudaStream_t st) {
    release();
    st_ = st;
    n_ = n;
    if (n > 0) RWKVX_TRAIN_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&p_), size_t(n) * sizeof(T), st));
  }
  // n zeroed elements.
  void zeros(int64_t n, cudaStream_t st) {
    reset(n, st);
    zero();
  }
  void zero() {
    if (n_ > 0) RWKVX_TRAIN_CUDA_CHECK(cudaMemsetAsync(p_, 0, size_t(n_) * sizeof(T), st_));
  }
  void upload(const T* src, int64_t n, cudaStream_t st) {
    if (n_ != n) reset(n, st);
    if (n > 0) RWKVX_TRAIN_CUDA_CHECK(cudaMemcpyAsync(p_, src, size_t(n) * sizeof(T), cudaMemcpyHostToDevice, st));
  }
  void upload(const std::vector<T>& v, cudaStream_t st) { upload(v.data(), int64_t(v.size()), st); }
  // Synchronous copy to the host (waits for the stream).
  std::vector<T> download() const {
    std::vector<T> v(static_cast<size_t>(n_));
    if (n_ > 0) {
      RWKVX_TRAIN_CUDA_CHECK(cudaMemcpyAsync(v.data(), p_, size_t(n_) * sizeof(T), cudaMemcpyDeviceToHost, st_));
      RWKVX_TRAIN_CUDA_CHECK(cudaStreamSynchronize(st_));
    }
    return v;
  }
  void release() {
    if (p_) cudaFreeAsync(p_, st_);  // never throws from a destructor; errors surface at the next check
    p_ = nullptr;
    n_ = 0;
  }

  T* data() { return p_; }
  const T* data() const { return p_; }
  int64_t size() const { return n_; }
  bool empty() const { return n_ == 0; }

 private:
  void swap(DeviceArray& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    std::swap(st_, o.st_);
  }
  T* p_ = nullptr;
  int64_t n_ = 0;
  cudaStream_t st_ = nullptr;
};

}  // namespace rwkvx::train::cuda
