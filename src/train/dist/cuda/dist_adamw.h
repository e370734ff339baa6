// ZeRO-1 AdamW for data-parallel training: the math, groups and clipping of CudaAdamW (and so of AdamW on
// the host), with each trainable tensor's moments kept by one owner rank (assign_owners, dist.h).
// step(): the gradients every rank accumulated over its share of the batch are summed into each tensor's
// owner (grouped ncclReduce), the global norm is the sum of the owners' per-tensor sums of squares (added
// in tensor order, as on one GPU), the owner clips and updates its tensors, and broadcasts the new values
// to the other ranks. Every rank must call every member (they are collectives), in the same order.
//
// Overlap (OverlapOptions, dist.h; on by default, RWKVX_DIST_OVERLAP=0 turns it off): overlap_next_backward()
// arms the model's next forward_backward (a rank's last local sequence of the step; the earlier ones only
// accumulate, like DDP's no_sync). Its backward hands each group of final gradients here (head and ln_out
// first, then block by block, the embedding last); they are packed into buckets of bucket_bytes and each
// bucket's grouped ncclReduce to the owners starts on a communication stream as soon as an event recorded
// on the compute stream says its gradients are written, while the backward of the earlier blocks goes on.
// step() then makes the compute stream wait for those reductions, reduces the tensors not handed over (in
// tensor order) and continues as without overlap. Each tensor goes through the same in-place ncclReduce
// either way and the norm is summed in the same order, so the results do not change.
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
  // Collective: checks that every rank has the same overlap options (they decide the collectives' order).
  DistAdamW(CudaTrainModel& model, const AdamWOptions& options, Communicator& comm,
            const OverlapOptions& overlap = overlap_options());
  ~DistAdamW();
  DistAdamW(const DistAdamW&) = delete;
  DistAdamW& operator=(const DistAdamW&) = delete;
  double step(double lr, double wd);  // returns the global gradient norm before clipping
  // Arms the model's next forward_backward (see above; nothing when the overlap is off); step() disarms it.
  // Every rank must arm its backward of the same step or none: a step in which some rank has no sequence
  // (global batch < world) must not be armed on any rank.
  void overlap_next_backward();
  const OverlapOptions& overlap() const { return overlap_; }
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
  void grads_ready(const std::vector<size_t>& idx);
  void launch(const std::vector<size_t>& bucket);
  struct Impl;
  CudaTrainModel* model_;
  AdamWOptions options_;
  OverlapOptions overlap_;
  Communicator* comm_;
  std::vector<int> owner_;
  std::unique_ptr<Impl> impl_;
  int64_t step_ = 0;
};

}  // namespace rwkvx::train::dist
