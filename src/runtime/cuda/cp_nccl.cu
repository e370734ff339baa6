// NCCL link of context-parallel prefill (cp_nccl.h).
#include "backend/cuda/cuda_internal.h"
#include "runtime/cuda/cp_nccl.h"

namespace rwkvx {

NcclCpLink::NcclCpLink(train::dist::Communicator& comm, Backend& backend) : comm_(comm) {
  auto* cb = dynamic_cast<cuda::CudaBackend*>(&backend);
  if (!cb) throw Error("context parallel over NCCL needs the CUDA backend (--device cuda)");
  stream_ = cb->stream();
}

void NcclCpLink::send(const Tensor& t, int peer) {
  RWKVX_ASSERT(t.device == Device::cuda, "NcclCpLink: host tensor");
  comm_.send(t.data, t.nbytes(), peer, stream_);
}

void NcclCpLink::recv(Tensor& t, int peer) {
  RWKVX_ASSERT(t.device == Device::cuda, "NcclCpLink: host tensor");
  comm_.recv(t.data, t.nbytes(), peer, stream_);
}

void NcclCpLink::synchronize() {
  const cudaError_t e = cudaStreamSynchronize(static_cast<cudaStream_t>(stream_));
  if (e != cudaSuccess) throw Error(std::string("context parallel: cudaStreamSynchronize: ") + cudaGetErrorString(e));
}

}  // namespace rwkvx
