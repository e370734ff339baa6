// The CpLink of context-parallel prefill on GPUs (runtime/context_parallel.h): NCCL send / recv through the
// data-parallel Communicator (train/dist/cuda/nccl_comm.h), enqueued on the CUDA backend's stream so that
// transfers and kernels stay in order without host synchronisation. Built only with -DRWKVX_CUDA=ON.
#pragma once
#include "runtime/context_parallel.h"
#include "train/dist/cuda/nccl_comm.h"

namespace rwkvx {

class NcclCpLink final : public CpLink {
 public:
  // `backend` must be a CUDA backend on this rank's device (make_cuda_backend after the Communicator).
  NcclCpLink(train::dist::Communicator& comm, Backend& backend);
  void send(const Tensor& t, int peer) override;
  void recv(Tensor& t, int peer) override;
  // Waits for everything enqueued on the backend's stream (kernels and transfers).
  void synchronize();

 private:
  train::dist::Communicator& comm_;
  void* stream_;
};

}  // namespace rwkvx
