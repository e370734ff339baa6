// ZeRO-1 AdamW over NCCL (dist_adamw.h).
#include "train/dist/cuda/dist_adamw.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "train/cuda/device_array.h"
#include "train/cuda/train_ops_cuda.h"

namespace rwkvx::train::dist {

namespace co = rwkvx::train::cuda;

namespace {
// Collectives per NCCL group: a bounded number of operations in flight at once.
constexpr size_t kGroupOps = 64;
}  // namespace

struct DistAdamW::Impl {
  std::vector<bool> active;
  std::vector<ParamGroup> group;
  std::vector<co::DeviceArray<float>> m, v;  // only the owned tensors'
  co::DeviceArray<double> sq;                 // one Σg² per tensor (owned ones; zero elsewhere)
  // The overlap: the communication stream, the compute → comm event of the latest bucket and the comm →
  // compute event of step(); the open bucket, the tensors handed over this step, and whether the model's
  // hook is armed and a bucket was launched.
  cudaStream_t cs = nullptr;
  cudaEvent_t ready = nullptr, done = nullptr;
  std::unique_ptr<Buckets> buckets;
  std::vector<char> handed;
  bool armed = false, launched = false;
};

DistAdamW::DistAdamW(CudaTrainModel& model, const AdamWOptions& options, Communicator& comm,
                     const OverlapOptions& overlap)
    : model_(&model), options_(options), overlap_(overlap), comm_(&comm), impl_(std::make_unique<Impl>()) {
  const size_t n = model.n_params();
  auto st = static_cast<cudaStream_t>(model.stream());
  // The ranks must launch the same collectives in the same order: the same overlap options everywhere.
  // (Σx and Σx² over the ranks agree with world·x and world·x² on every rank only if all x are equal.)
  const double on = overlap.on ? 1.0 : 0.0, kib = double(overlap.bucket_bytes >> 10), w = double(comm.world());
  const double s_on = comm.all_reduce_sum_host(on), s_kib = comm.all_reduce_sum_host(kib),
               s_kib2 = comm.all_reduce_sum_host(kib * kib);
  if (s_on != w * on || s_kib != w * kib || s_kib2 != w * kib * kib)
    throw Error("data parallel: RWKVX_DIST_OVERLAP / RWKVX_DIST_BUCKET_MB differ between the ranks (rank " +
                std::to_string(comm.rank()) + " has " + std::to_string(int(on)) + " / " +
                std::to_string(overlap.bucket_bytes >> 20) + " MiB); set them alike for every rank");
  if (overlap.on) {
    int least = 0, greatest = 0;
    RWKVX_TRAIN_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    RWKVX_TRAIN_CUDA_CHECK(cudaStreamCreateWithPriority(&impl_->cs, cudaStreamNonBlocking, greatest));
    RWKVX_TRAIN_CUDA_CHECK(cudaEventCreateWithFlags(&impl_->ready, cudaEventDisableTiming));
    RWKVX_TRAIN_CUDA_CHECK(cudaEventCreateWithFlags(&impl_->done, cudaEventDisableTiming));
    impl_->buckets = std::make_unique<Buckets>(overlap.bucket_bytes);
  }
  impl_->handed.assign(n, 0);
  std::vector<int64_t> sizes(n, 0);
  for (size_t i = 0; i < n; ++i)
    if (model.param(i).trainable) sizes[i] = model.param(i).numel;
  owner_ = assign_owners(sizes, comm.world());
  impl_->active.resize(n), impl_->group.resize(n), impl_->m.resize(n), impl_->v.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const TrainParam& p = model.param(i);
    impl_->active[i] = p.trainable;
    impl_->group[i] = param_group(p.name, p.shape, options.groups);
    if (p.trainable && owner_[i] == comm.rank()) impl_->m[i].zeros(p.numel, st), impl_->v[i].zeros(p.numel, st);
  }
  impl_->sq.zeros(int64_t(n), st);
  model.synchronize();
}
DistAdamW::~DistAdamW() {
  if (impl_->armed) model_->set_grad_ready_hook(nullptr);
  if (impl_->cs) cudaStreamSynchronize(impl_->cs);
  if (impl_->ready) cudaEventDestroy(impl_->ready);
  if (impl_->done) cudaEventDestroy(impl_->done);
  if (impl_->cs) cudaStreamDestroy(impl_->cs);
}

void DistAdamW::overlap_next_backward() {
  if (!overlap_.on) return;
  impl_->armed = true;
  model_->set_grad_ready_hook([this](const std::vector<size_t>& idx) { grads_ready(idx); });
}

void DistAdamW::grads_ready(const std::vector<size_t>& idx) {
  for (size_t i : idx) {
    if (!impl_->active[i]) continue;  // trainable only since this optimizer was made: not its tensor
    if (impl_->handed[i])
      throw Error("DistAdamW: the gradient of '" + model_->param(i).name +
                  "' was handed over twice in one step (overlap_next_backward arms one backward)");
    impl_->handed[i] = 1;
    if (impl_->buckets->add(i, model_->param(i).numel * int64_t(sizeof(float)))) launch(impl_->buckets->take());
  }
}

// One bucket's reductions on the communication stream, after the compute stream's work so far (which
// wrote the bucket's gradients); in groups of kGroupOps as in step().
void DistAdamW::launch(const std::vector<size_t>& bucket) {
  if (bucket.empty()) return;
  auto st = static_cast<cudaStream_t>(model_->stream());
  RWKVX_TRAIN_CUDA_CHECK(cudaEventRecord(impl_->ready, st));
  RWKVX_TRAIN_CUDA_CHECK(cudaStreamWaitEvent(impl_->cs, impl_->ready, 0));
  for (size_t k = 0; k < bucket.size(); k += kGroupOps) {
    comm_->group_start();
    for (size_t j = k; j < std::min(bucket.size(), k + kGroupOps); ++j)
      comm_->reduce_sum(model_->device_grad(bucket[j]), model_->param(bucket[j]).numel, owner_[bucket[j]], impl_->cs);
    comm_->group_end();
  }
  impl_->launched = true;
}

int64_t DistAdamW::moment_bytes() const {
  int64_t b = 0;
  for (size_t i = 0; i < impl_->m.size(); ++i) b += 8 * impl_->m[i].size();
  return b;
}

double DistAdamW::step(double lr, double wd) {
  const size_t n = model_->n_params();
  const int me = comm_->rank();
  auto st = static_cast<cudaStream_t>(model_->stream());
  for (size_t i = 0; i < n; ++i)
    if (impl_->active[i] && !model_->param(i).trainable)
      throw Error("AdamW: tensor '" + model_->param(i).name + "' was frozen after the optimizer was made");
  // 1. Each tensor's gradient, summed over the ranks, into its owner. With the overlap the buckets handed
  // over in the backward are under way on the communication stream: launch the open one, let the compute
  // stream wait for all of them, then reduce the tensors not handed over.
  if (impl_->armed) model_->set_grad_ready_hook(nullptr), impl_->armed = false;
  if (impl_->buckets && !impl_->buckets->empty()) launch(impl_->buckets->take());
  if (impl_->launched) {
    RWKVX_TRAIN_CUDA_CHECK(cudaEventRecord(impl_->done, impl_->cs));
    RWKVX_TRAIN_CUDA_CHECK(cudaStreamWaitEvent(st, impl_->done, 0));
    impl_->launched = false;
  }
  const std::vector<char> handed = std::move(impl_->handed);
  impl_->handed.assign(n, 0);
  auto grouped = [&](auto&& op, bool skip_handed) {
    size_t in_group = 0;
    for (size_t i = 0; i < n; ++i) {
      if (!impl_->active[i] || (skip_handed && handed[i])) continue;
      if (in_group == 0) comm_->group_start();
      op(i);
      if (++in_group == kGroupOps) comm_->group_end(), in_group = 0;
    }
    if (in_group) comm_->group_end();
  };
  grouped([&](size_t i) { comm_->reduce_sum(model_->device_grad(i), model_->param(i).numel, owner_[i], st); }, true);
  // 2. The global norm: the owners' per-tensor Σg², summed over ranks (one non-zero term each), added in
  // tensor order on the host as CudaAdamW does.
  impl_->sq.zero();
  for (size_t i = 0; i < n; ++i)
    if (impl_->active[i] && owner_[i] == me)
      co::sum_squares(st, model_->device_grad(i), model_->param(i).numel, impl_->sq.data() + i);
  comm_->all_reduce_sum(impl_->sq.data(), int64_t(n), st);
  const std::vector<double> sq = impl_->sq.download();
  double total = 0;
  for (size_t i = 0; i < n; ++i)
    if (impl_->active[i]) total += sq[i];
  const double norm = std::sqrt(total);
  // 3. Clip and update the owned tensors.
  if (options_.grad_clip > 0) {
    const double coef = options_.grad_clip / (norm + 1e-6);
    if (coef < 1.0)
      for (size_t i = 0; i < n; ++i)
        if (impl_->active[i] && owner_[i] == me)
          co::scale_inplace(st, model_->device_grad(i), model_->param(i).numel, coef);
  }
  ++step_;
  const double b1 = options_.beta1, b2 = options_.beta2;
  const double bc1 = 1.0 - std::pow(b1, double(step_)), bc2_sqrt = std::sqrt(1.0 - std::pow(b2, double(step_)));
  for (size_t i = 0; i < n; ++i) {
    if (!impl_->active[i] || owner_[i] != me) continue;
    const double lr_i = lr * impl_->group[i].lr_scale, wd_i = impl_->group[i].decay ? wd : 0.0;
    co::adamw_update(st, model_->device_value(i), model_->device_grad(i), impl_->m[i].data(), impl_->v[i].data(),
                     model_->param(i).numel, lr_i, wd_i, b1, b2, options_.eps, bc1, bc2_sqrt);
  }
  // 4. The new values from each owner to every rank.
  grouped([&](size_t i) { comm_->broadcast(model_->device_value(i), model_->param(i).numel, owner_[i], st); }, false);
  model_->synchronize();
  return norm;
}

std::vector<float> DistAdamW::gather(size_t i, bool second) {
  RWKVX_ASSERT(impl_->active.at(i), "DistAdamW: moments of a frozen tensor");
  auto st = static_cast<cudaStream_t>(model_->stream());
  const int64_t n = model_->param(i).numel;
  co::DeviceArray<float> tmp;
  float* buf = nullptr;
  if (owner_[i] == comm_->rank()) {
    buf = second ? impl_->v[i].data() : impl_->m[i].data();
  } else {
    tmp.reset(n, st);
    buf = tmp.data();
  }
  comm_->broadcast(buf, n, owner_[i], st);
  std::vector<float> out(static_cast<size_t>(n));
  RWKVX_TRAIN_CUDA_CHECK(cudaMemcpyAsync(out.data(), buf, size_t(n) * sizeof(float), cudaMemcpyDeviceToHost, st));
  RWKVX_TRAIN_CUDA_CHECK(cudaStreamSynchronize(st));
  return out;
}
std::vector<float> DistAdamW::exp_avg(size_t i) { return gather(i, false); }
std::vector<float> DistAdamW::exp_avg_sq(size_t i) { return gather(i, true); }

void DistAdamW::set_moments(size_t i, const std::vector<float>& m, const std::vector<float>& v) {
  RWKVX_ASSERT(impl_->active.at(i) && int64_t(m.size()) == model_->param(i).numel &&
                   int64_t(v.size()) == model_->param(i).numel,
               "DistAdamW: moments of a frozen tensor or of the wrong size");
  if (owner_[i] != comm_->rank()) return;
  auto st = static_cast<cudaStream_t>(model_->stream());
  impl_->m[i].upload(m, st), impl_->v[i].upload(v, st);
  model_->synchronize();
}

}  // namespace rwkvx::train::dist
