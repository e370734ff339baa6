// Communicator over NCCL loaded with dlopen (nccl_comm.h).
#include "train/dist/cuda/nccl_comm.h"

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <nccl.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "core/error.h"

namespace rwkvx::train::dist {
namespace {

struct Nccl {
  void* lib = nullptr;
  ncclResult_t (*GetVersion)(int*) = nullptr;
  ncclResult_t (*GetUniqueId)(ncclUniqueId*) = nullptr;
  ncclResult_t (*CommInitRank)(ncclComm_t*, int, ncclUniqueId, int) = nullptr;
  ncclResult_t (*CommDestroy)(ncclComm_t) = nullptr;
  ncclResult_t (*CommAbort)(ncclComm_t) = nullptr;
  const char* (*GetErrorString)(ncclResult_t) = nullptr;
  ncclResult_t (*AllReduce)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*Reduce)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, int, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*Broadcast)(const void*, void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*AllGather)(const void*, void*, size_t, ncclDataType_t, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*Send)(const void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*Recv)(void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*GroupStart)() = nullptr;
  ncclResult_t (*GroupEnd)() = nullptr;
  std::string version;
};

const Nccl& nccl() {
  static Nccl n;
  static std::once_flag once;
  static std::string error;
  std::call_once(once, [] {
    std::vector<std::string> names;
    if (const char* p = std::getenv("RWKVX_NCCL_LIBRARY"); p && *p) names.push_back(p);
    names.push_back("libnccl.so.2");
    names.push_back("libnccl.so");
    std::string why;
    for (const std::string& name : names) {
      n.lib = dlopen(name.c_str(), RTLD_NOW | RTLD_GLOBAL);
      if (n.lib) break;
      const char* e = dlerror();
      why += (why.empty() ? "" : "; ") + std::string(e ? e : name);
    }
    if (!n.lib) {
      error = "cannot load NCCL (" + why +
              "): install it, or point LD_LIBRARY_PATH or RWKVX_NCCL_LIBRARY at libnccl.so.2 (the pip package "
              "nvidia-nccl-cu13 has it in site-packages/nvidia/nccl/lib)";
      return;
    }
    auto sym = [&](auto& fn, const char* s) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(n.lib, s));
      if (!fn && error.empty()) error = std::string("NCCL library has no symbol ") + s;
    };
    sym(n.GetVersion, "ncclGetVersion");
    sym(n.GetUniqueId, "ncclGetUniqueId");
    sym(n.CommInitRank, "ncclCommInitRank");
    sym(n.CommDestroy, "ncclCommDestroy");
    sym(n.CommAbort, "ncclCommAbort");
    sym(n.GetErrorString, "ncclGetErrorString");
    sym(n.AllReduce, "ncclAllReduce");
    sym(n.Reduce, "ncclReduce");
    sym(n.Broadcast, "ncclBroadcast");
    sym(n.AllGather, "ncclAllGather");
    sym(n.Send, "ncclSend");
    sym(n.Recv, "ncclRecv");
    sym(n.GroupStart, "ncclGroupStart");
    sym(n.GroupEnd, "ncclGroupEnd");
    int v = 0;
    if (error.empty() && n.GetVersion(&v) == ncclSuccess) n.version = std::to_string(v);
  });
  if (!error.empty()) throw Error(error);
  return n;
}

void check(ncclResult_t r, const char* what) {
  if (r != ncclSuccess)
    throw Error(std::string("NCCL: ") + what + ": " + nccl().GetErrorString(r) +
                " (NCCL_DEBUG=WARN in the environment says more)");
}
void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("data parallel: ") + what + ": " + cudaGetErrorString(e));
}

}  // namespace

struct Communicator::Impl {
  ncclComm_t comm = nullptr;
  cudaStream_t st = nullptr;  // for the host conveniences
  double* scratch = nullptr;
};

Communicator::Communicator(const DistEnv& env)
    : impl_(std::make_unique<Impl>()), rank_(env.rank), world_(env.world), init_path_(env.init) {
  const Nccl& n = nccl();
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (env.local_rank >= count)
    throw Error("rank " + std::to_string(rank_) + ": LOCAL_RANK=" + std::to_string(env.local_rank) + " but only " +
                std::to_string(count) + " GPU(s) are visible");
  check_cuda(cudaSetDevice(env.local_rank), "cudaSetDevice(LOCAL_RANK)");
  // NVLink SHARP (multicast objects) stays off unless the user asked otherwise.
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  ncclUniqueId id;
  std::memset(&id, 0, sizeof id);
  if (rank_ == 0) {
    check(n.GetUniqueId(&id), "ncclGetUniqueId");
    publish_rendezvous(env.init, &id, sizeof id);
  } else {
    const std::vector<uint8_t> b = await_rendezvous(env.init, sizeof id, env.timeout_s, rank_, world_);
    std::memcpy(&id, b.data(), sizeof id);
  }
  check(n.CommInitRank(&impl_->comm, world_, id, rank_), "ncclCommInitRank");
  check_cuda(cudaStreamCreateWithFlags(&impl_->st, cudaStreamNonBlocking), "cudaStreamCreate");
  check_cuda(cudaMalloc(&impl_->scratch, 4 * sizeof(double)), "cudaMalloc");
}

Communicator::~Communicator() {
  if (impl_->st) cudaStreamSynchronize(impl_->st);
  if (impl_->comm) nccl().CommDestroy(impl_->comm);
  if (impl_->scratch) cudaFree(impl_->scratch);
  if (impl_->st) cudaStreamDestroy(impl_->st);
  if (rank_ == 0) remove_rendezvous(init_path_);
}

void Communicator::all_reduce_sum(float* buf, int64_t n, void* stream) {
  if (n > 0)
    check(nccl().AllReduce(buf, buf, size_t(n), ncclFloat32, ncclSum, impl_->comm, static_cast<cudaStream_t>(stream)),
          "ncclAllReduce");
}
void Communicator::all_reduce_sum(double* buf, int64_t n, void* stream) {
  if (n > 0)
    check(nccl().AllReduce(buf, buf, size_t(n), ncclFloat64, ncclSum, impl_->comm, static_cast<cudaStream_t>(stream)),
          "ncclAllReduce");
}
void Communicator::reduce_sum(float* buf, int64_t n, int root, void* stream) {
  if (n > 0)
    check(nccl().Reduce(buf, buf, size_t(n), ncclFloat32, ncclSum, root, impl_->comm, static_cast<cudaStream_t>(stream)),
          "ncclReduce");
}
void Communicator::broadcast(float* buf, int64_t n, int root, void* stream) {
  if (n > 0)
    check(nccl().Broadcast(buf, buf, size_t(n), ncclFloat32, root, impl_->comm, static_cast<cudaStream_t>(stream)),
          "ncclBroadcast");
}
void Communicator::all_gather(const float* send, float* recv, int64_t n_per_rank, void* stream) {
  if (n_per_rank > 0)
    check(nccl().AllGather(send, recv, size_t(n_per_rank), ncclFloat32, impl_->comm, static_cast<cudaStream_t>(stream)),
          "ncclAllGather");
}
void Communicator::send(const void* buf, size_t bytes, int peer, void* stream) {
  if (bytes > 0)
    check(nccl().Send(buf, bytes, ncclUint8, peer, impl_->comm, static_cast<cudaStream_t>(stream)), "ncclSend");
}
void Communicator::recv(void* buf, size_t bytes, int peer, void* stream) {
  if (bytes > 0)
    check(nccl().Recv(buf, bytes, ncclUint8, peer, impl_->comm, static_cast<cudaStream_t>(stream)), "ncclRecv");
}
void Communicator::group_start() { check(nccl().GroupStart(), "ncclGroupStart"); }
void Communicator::group_end() { check(nccl().GroupEnd(), "ncclGroupEnd"); }

double Communicator::all_reduce_sum_host(double x) {
  check_cuda(cudaMemcpyAsync(impl_->scratch, &x, sizeof x, cudaMemcpyHostToDevice, impl_->st), "cudaMemcpyAsync");
  all_reduce_sum(impl_->scratch, 1, impl_->st);
  check_cuda(cudaMemcpyAsync(&x, impl_->scratch, sizeof x, cudaMemcpyDeviceToHost, impl_->st), "cudaMemcpyAsync");
  check_cuda(cudaStreamSynchronize(impl_->st), "cudaStreamSynchronize");
  return x;
}
void Communicator::barrier() { all_reduce_sum_host(0.0); }

}  // namespace rwkvx::train::dist
