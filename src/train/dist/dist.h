// Data-parallel training, the parts that need no GPU (docs/training.md "Data-parallel training"): the
// launcher's environment, the file rendezvous, the split of a batch over ranks and the ZeRO-1 owner of
// each trainable tensor. The NCCL communicator and the sharded optimizer are in dist/cuda/.
//
// Launch model (torchrun-like; scripts/launch_dp.sh): one process per GPU with RANK, WORLD_SIZE,
// LOCAL_RANK (the GPU index, cudaSetDevice(LOCAL_RANK); defaults to RANK) and RWKVX_DIST_INIT=file:///path
// (the rendezvous file). WORLD_SIZE unset or 1: single process, none of the others is read, unless
// RWKVX_DIST_FORCE=1: then one rank runs the data-parallel code path (NCCL with one rank, DistAdamW), for
// tests and comparisons (it needs RWKVX_DIST_INIT as well).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace rwkvx::train::dist {

struct DistEnv {
  int rank = 0, world = 1, local_rank = 0;
  std::string init;               // the rendezvous file's path (file:// stripped)
  double timeout_s = 300;         // RWKVX_DIST_TIMEOUT: how long ranks > 0 wait for the rendezvous file
  bool force = false;             // RWKVX_DIST_FORCE=1: the data-parallel path even for a world of 1
  bool distributed() const { return world > 1 || force; }
};

// The environment through `get` (nullptr = unset); throws rwkvx::Error naming the variable that is
// missing or malformed.
DistEnv dist_env_from(const std::function<const char*(const char*)>& get);
DistEnv dist_env();  // from the process environment

// The samples of a global batch of B that `rank` trains: b ≡ rank (mod world), in increasing order. The
// global batch and its order are the same for every world size; so is the data position of every step.
std::vector<int64_t> local_samples(int64_t B, int rank, int world);

// ZeRO-1 owners: sizes[i] = elements of tensor i (0: not trainable, owner -1). Greedy and deterministic:
// tensors by decreasing size (ties: lower index first), each to the rank with the fewest elements so far
// (ties: lower rank).
std::vector<int> assign_owners(const std::vector<int64_t>& sizes, int world);

// The gradient reduction overlapped with the backward (DistAdamW): RWKVX_DIST_OVERLAP = 1 (the default) or
// 0 (every gradient is reduced after the whole backward, as before), RWKVX_DIST_BUCKET_MB = the byte cap
// of a bucket in MiB (default 25; 0 = every tensor its own bucket). Throws rwkvx::Error naming a
// malformed variable.
struct OverlapOptions {
  bool on = true;
  int64_t bucket_bytes = int64_t(25) << 20;
};
OverlapOptions overlap_options_from(const std::function<const char*(const char*)>& get);
OverlapOptions overlap_options();  // from the process environment

// Buckets of tensors whose gradients became final, in the order they were handed over: add() appends a
// tensor to the open bucket and returns true when the bucket holds `cap` bytes or more (then take() it);
// take() returns the open bucket (possibly empty) and starts a new one. Each bucket is one run of
// consecutive tensors, so every rank that hands over the same tensors in the same order gets the same
// buckets.
class Buckets {
 public:
  explicit Buckets(int64_t cap_bytes) : cap_(cap_bytes) {}
  bool add(size_t i, int64_t bytes);
  std::vector<size_t> take();
  bool empty() const { return open_.empty(); }

 private:
  int64_t cap_, bytes_ = 0;
  std::vector<size_t> open_;
};

// File rendezvous. Rank 0 publishes `n` bytes (the ncclUniqueId) to `path` atomically (temp + rename);
// the other ranks poll for it. A file older than this process's start minus 60 s is a stale one from an
// earlier job and is ignored. Throws rwkvx::Error after `timeout_s` naming the path, the rank and what to
// check.
void publish_rendezvous(const std::string& path, const void* data, size_t n);
std::vector<uint8_t> await_rendezvous(const std::string& path, size_t n, double timeout_s, int rank, int world);
void remove_rendezvous(const std::string& path);

}  // namespace rwkvx::train::dist
