// Context-parallel prefill (README "Context-parallel prefill"): one long sequence split into W contiguous
// segments, one per rank (GPU); every rank holds the whole model. The ranks form a wavefront over the
// blocks in execution order: before running block b over its segment, rank r receives from rank r-1 that
// block's state after every earlier token (RWKV block: token shifts and WKV state; sparse block: channel-mix
// shift and the KV cache with its chunk means, all rows of the prefix), and after running it sends its own
// block-b state on to rank r+1. So rank r runs block b while rank r-1 runs block b+1: W ranks take about
// (L + W - 1) / (L·W) of one GPU's time for L blocks.
//
// Exactness: each rank runs its segment window by window (config().max_rows_per_call rows), block by
// block, with windows anchored at position 0 of the sequence exactly like Model::forward's, and segment
// boundaries are multiples of the sparse chunk size (chunk means of the prefix are complete) and of the
// window. Every op then sees the same rows, the same state and the same cache as in Model::forward over
// the whole sequence, so the last rank's logits and state equal the single-GPU ones bit for bit.
//
// The runner is backend-agnostic: ranks talk through a CpLink (NCCL on GPUs: runtime/cuda/, built with
// RWKVX_CUDA; tests use an in-memory one on the CPU).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "model/model.h"

namespace rwkvx {

struct CpSegment {
  int64_t begin = 0, end = 0;  // tokens [begin, end)
  int64_t size() const { return end - begin; }
};

// W contiguous segments covering [0, T): every boundary a multiple of `align` (> 0). cost_slope 0: sizes
// as equal as whole units of `align` allow (earlier ranks take the extra units; the last also takes
// T mod align). cost_slope s > 0: a token at position t is taken to cost 1 + s·t/T (attention over a
// longer prefix costs more), and each rank gets an equal share of the total cost (rounded to units).
// One rank: the whole [0, T). Throws rwkvx::Error when T < 1, world < 1, align < 1 or (world > 1) T holds
// fewer than `world` whole units.
std::vector<CpSegment> plan_segments(int64_t T, int world, int64_t align, double cost_slope = 0);

// The alignment a model needs: lcm(sparse chunk size if it has sparse blocks, max_rows_per_call).
int64_t cp_alignment(const ModelConfig& cfg);

// Point-to-point transfer of whole tensors (their bytes) between ranks, in call order. A send may return
// before the peer received (buffers are not written again by the runner afterwards).
class CpLink {
 public:
  virtual ~CpLink() = default;
  virtual void send(const Tensor& t, int peer) = 0;
  virtual void recv(Tensor& t, int peer) = 0;
};

struct CpTiming {
  std::function<void(size_t block)> after_block;  // called after each block (progress, tests)
};

// Rank `rank` of `world`: runs segment plan[rank] of `ids` (the whole sequence, ids[0..T)) through the
// model, block by block, into `state` (slot 0 of a fresh model.new_state(1); on return it holds the state
// after ids[0..segment end): on the last rank, the state after the whole sequence). Returns the logits
// [1, V] of the segment's last token (the sequence's last token on the last rank). `link` may be null when
// world == 1. cost_slope: the segment plan's (plan_segments; every rank must pass the same). Throws
// rwkvx::Error for KV eviction (not supported here) or a bad plan.
Tensor context_parallel_prefill(const Model& model, const int32_t* ids, int64_t T, int rank, int world,
                                CpLink* link, State& state, const CpTiming* timing = nullptr,
                                double cost_slope = 0);

// The cost slope that balances the CUDA backend's prefill (measured on H200, RWKV-X 0.2B, 1M tokens):
// with an fp32 KV cache the selected rows are re-split to bf16 on every call, so late tokens cost more.
double cp_default_cost_slope(const ModelConfig& cfg, bool cuda);

}  // namespace rwkvx
