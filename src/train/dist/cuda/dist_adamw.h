// ZeRO-1 AdamW for data-parallel training: the math, groups and clipping of CudaAdamW (and so of AdamW on
// the host), with each trainable tensor's moments kept by one owner rank (assign_owners, dist.h).
// step(): the gradients every rank accumulated over its share of the batch are summed into each tensor's
// owner (grouped ncclReduce), the global norm is the sum of the owners' per-tensor sums of squares (added
// in tensor order, as on one GPU), the owner clips and updates its tensors, and broadcasts the new values
// to the other ranks. Every rank must call every member (they are collectives), in the same order.
// Built only with -DRWKVX_CUDA=ON.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "train/cuda/cuda_train_model.h"
#include "train/dist/cuda/nccl_comm.h"
#include "train/optimizer.h"

namespace rwkvx::train::dist {

class DistAdamW {
 public:
  DistAdamW(CudaTrainModel& model, const AdamWOptions& options, Communicator& comm);
  ~DistAdamW();
  double step(double lr, double wd);  // returns the global gradient norm before clipping
  int64_t steps() const { return step_; }
  void set_steps(int64_t n) { step_ = n; }
  int owner(size_t i) const { return owner_.at(i); }  // -1: frozen
  // Moments of tensor i on every rank (broadcast from its owner; collective), for states written by rank 0.
  std::vector<float> exp_avg(size_t i);
  std::vector<float> exp_avg_sq(size_t i);
  // Moments of tensor i: kept by its owner, ignored by the others (call on every rank).
  void set_moments(size_t i, const std::vector<float>& m, const std::vector<float>& v);
  // Bytes of moments this rank holds (2 × the elements it owns × 4).
  int64_t moment_bytes() const;

 private:
  std::vector<float> gather(size_t i, bool second);
  struct Impl;
  CudaTrainModel* model_;
  AdamWOptions options_;
  Communicator* comm_;
  std::vector<int> owner_;
  std::unique_ptr<Impl> impl_;
  int64_t step_ = 0;
};

}  // namespace rwkvx::train::dist
