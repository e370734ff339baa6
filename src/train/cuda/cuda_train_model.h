// The trainable model on an NVIDIA GPU: the same schedule, losses and gradients as TrainModelT (the CPU
// trainer, train_model.h), with parameters, gradients and activations on the device and every op from
// train_ops_cuda.h. The host model is the parameter source and sink (load, checkpoints); this one holds
// the working copy. S = float trains (GEMMs in bf16 with fp32 accumulation by default, or exact fp32);
// S = double runs the fp64 finite-difference gradient checks on the GPU.
//
// Built only with -DRWKVX_CUDA=ON; constructing one without a usable GPU throws rwkvx::Error.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "train/optimizer.h"
#include "train/train_model.h"

namespace rwkvx::train {

struct CudaTrainOptions {
  bool bf16_gemm = true;   // S = float: dense products with bf16 operands (false: exact fp32 cuBLAS)
  int64_t head_rows = 1024;  // positions per head/loss block ([rows, V] fp32 logits: 256 MB at V = 65536)
};

template <class S>
class CudaTrainModelT {
 public:
  // Uploads the host model's parameters and trainable flags (and its config, recompute, wkv_save_every).
  CudaTrainModelT(const TrainModelT<S>& host, const CudaTrainOptions& options);
  ~CudaTrainModelT();
  CudaTrainModelT(const CudaTrainModelT&) = delete;
  CudaTrainModelT& operator=(const CudaTrainModelT&) = delete;

  const ModelConfig& config() const;
  size_t n_params() const;
  const TrainParam& param(size_t i) const;
  bool recompute = false;       // keep only each block's input; recompute the block in the backward
  int64_t wkv_save_every = 16;  // WKV state snapshot interval

  // As TrainModelT: forward, loss, backward; ADDs this sequence's gradient to the device gradients.
  LossReport forward_backward(const int32_t* ids, const int32_t* targets, int64_t T, const LossOptions& opt);
  LossReport forward_backward_weighted(const int32_t* ids, const int32_t* targets, const double* weights, int64_t T,
                                       const LossOptions& opt);
  double objective(const int32_t* ids, const int32_t* targets, const double* weights, int64_t T,
                   const LossOptions& opt);
  std::vector<double> position_losses(const int32_t* ids, const int32_t* targets, int64_t T, const LossOptions& opt);
  std::vector<S> logits(const int32_t* ids, int64_t T);

  // Gradient-ready hook (the data-parallel overlap, dist/cuda/dist_adamw.h). When set, the backward of
  // forward_backward calls it each time the gradients of a group of parameters are final for that call,
  // with their indices (trainable tensors only; never an empty list): the head and ln_out first, then each
  // block's tensors as its backward ends (last block first), ln0 and the embedding last; every tensor once.
  // The work that produces them is enqueued on stream() when it is called (not necessarily finished), and
  // no later work of that call writes them. Called on the calling thread. Nothing else changes: with or
  // without a hook the same work runs in the same order. An empty function removes it.
  using GradReadyHook = std::function<void(const std::vector<size_t>&)>;
  void set_grad_ready_hook(GradReadyHook hook);

  void zero_grad();
  void set_trainable(size_t i, bool trainable);
  // Host ↔ device copies of the parameters and gradients (same order and names as the host model).
  void upload_values(const TrainModelT<S>& host);
  void download_values(TrainModelT<S>& host) const;
  void download_grads(TrainModelT<S>& host) const;
  std::vector<S> value(size_t i) const;
  std::vector<S> grad(size_t i) const;
  void set_value(size_t i, const std::vector<S>& v);  // one tensor (finite-difference checks)

  // Device pointers for the optimizer (null gradient for frozen tensors).
  S* device_value(size_t i);
  S* device_grad(size_t i);
  void* stream() const;  // the cudaStream_t everything runs on
  void synchronize() const;
  // Bytes of device memory this process holds at its peak since the last reset (the stream pool's high
  // water mark) and a reset of it.
  int64_t peak_device_bytes() const;
  void reset_peak_device_bytes();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

using CudaTrainModel = CudaTrainModelT<float>;

// AdamW on the device, the same math, groups and clipping as AdamW (optimizer.h) on the host.
class CudaAdamW {
 public:
  CudaAdamW(CudaTrainModel& model, const AdamWOptions& options);
  ~CudaAdamW();
  double step(double lr, double wd);  // returns the gradient norm before clipping
  int64_t steps() const { return step_; }
  void set_steps(int64_t n) { step_ = n; }
  // Moments of tensor i (empty for frozen tensors), for exact-resume states.
  std::vector<float> exp_avg(size_t i) const;
  std::vector<float> exp_avg_sq(size_t i) const;
  void set_moments(size_t i, const std::vector<float>& m, const std::vector<float>& v);

 private:
  struct Impl;
  CudaTrainModel* model_;
  AdamWOptions options_;
  std::unique_ptr<Impl> impl_;
  int64_t step_ = 0;
};

}  // namespace rwkvx::train
