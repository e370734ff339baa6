// The NCCL communicator of data-parallel training (docs/training.md "Data-parallel training") and of
// context-parallel prefill (runtime/cuda/cp_nccl.h). NCCL is loaded at run time (dlopen of
// $RWKVX_NCCL_LIBRARY, else libnccl.so.2 on the library path), so binaries need it only when
// WORLD_SIZE > 1. NVLink SHARP / multicast stays off: NCCL_NVLS_ENABLE=0 is set before
// the communicator is made (unless the environment sets it already) and nothing here creates multicast
// objects. Built only with -DRWKVX_CUDA=ON.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "train/dist/dist.h"

namespace rwkvx::train::dist {

class Communicator {
 public:
  // cudaSetDevice(env.local_rank), then the file rendezvous (rank 0 makes and publishes the unique id) and
  // ncclCommInitRank. Throws rwkvx::Error (no GPU of that index, no NCCL, rendezvous timeout, NCCL error).
  explicit Communicator(const DistEnv& env);
  ~Communicator();  // ncclCommDestroy; rank 0 removes the rendezvous file
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int world() const { return world_; }

  // Collectives on device buffers, enqueued on `stream` (a cudaStream_t); in place where one buffer is given.
  void all_reduce_sum(float* buf, int64_t n, void* stream);
  void all_reduce_sum(double* buf, int64_t n, void* stream);
  void reduce_sum(float* buf, int64_t n, int root, void* stream);  // the sum lands in root's buf
  void broadcast(float* buf, int64_t n, int root, void* stream);
  void all_gather(const float* send, float* recv, int64_t n_per_rank, void* stream);
  // Point to point (context-parallel prefill): `bytes` bytes to / from rank `peer`, enqueued on `stream`;
  // every send needs the matching recv on the peer, in the same order.
  void send(const void* buf, size_t bytes, int peer, void* stream);
  void recv(void* buf, size_t bytes, int peer, void* stream);
  // Several collectives as one NCCL group (ncclGroupStart / ncclGroupEnd).
  void group_start();
  void group_end();

  // Host conveniences (synchronous, on an internal stream): the sum over ranks of a few doubles, a
  // barrier.
  double all_reduce_sum_host(double x);
  void barrier();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, world_ = 1;
  std::string init_path_;
};

}  // namespace rwkvx::train::dist
