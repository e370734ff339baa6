// Context-parallel prefill: segment plan and the per-rank wavefront (context_parallel.h).
#include "runtime/context_parallel.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "core/error.h"

namespace rwkvx {

std::vector<CpSegment> plan_segments(int64_t T, int world, int64_t align, double cost_slope) {
  if (T < 1) throw Error("context parallel: nothing to prefill (" + std::to_string(T) + " tokens)");
  if (world < 1) throw Error("context parallel: world size " + std::to_string(world) + " < 1");
  if (align < 1) throw Error("context parallel: segment alignment " + std::to_string(align) + " < 1");
  if (!(cost_slope >= 0)) throw Error("context parallel: cost slope must be >= 0");
  if (world == 1) return {CpSegment{0, T}};  // one rank: nothing to align
  const int64_t units = T / align;
  if (units < world)
    throw Error("context parallel: " + std::to_string(T) + " tokens hold " + std::to_string(units) +
                " whole units of " + std::to_string(align) + " (the sparse chunk size and the rows per call), fewer "
                "than the " + std::to_string(world) + " ranks: use fewer GPUs or a longer sequence");
  // Boundary r in whole units: equal units (slope 0), or where the cumulative cost
  // C(x) = x + slope·x²/(2T) reaches r/W of C(T), rounded to the nearest unit; at least one unit per rank.
  std::vector<int64_t> cut(static_cast<size_t>(world) + 1, 0);
  for (int r = 1; r < world; ++r) {
    int64_t u;
    if (cost_slope == 0) {
      u = cut[size_t(r) - 1] + units / world + (r - 1 < units % world ? 1 : 0);
    } else {
      const double Td = double(T), target = (Td + cost_slope * Td / 2) * r / world;
      const double x = Td * (std::sqrt(1 + 2 * cost_slope * target / Td) - 1) / cost_slope;
      u = std::llround(x / double(align));
    }
    cut[size_t(r)] = std::min(std::max(u, cut[size_t(r) - 1] + 1), units - (world - r));
  }
  std::vector<CpSegment> plan(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) {
    plan[size_t(r)].begin = cut[size_t(r)] * align;
    plan[size_t(r)].end = r == world - 1 ? T : cut[size_t(r) + 1] * align;
  }
  return plan;
}

int64_t cp_alignment(const ModelConfig& cfg) {
  const int64_t rows = std::max<int64_t>(1, cfg.max_rows_per_call);
  return cfg.n_sparse > 0 ? std::lcm(int64_t(cfg.sparse.chunk), rows) : rows;
}

double cp_default_cost_slope(const ModelConfig& cfg, bool cuda) {
  // H200, RWKV-X 0.2B, 1M tokens: 1 GPU 11.0 s with fp32 KV, 6.7 s with bf16 KV (so with fp32 the cost
  // grows with position: cost(t) = a + b·t, a·T ≈ 6.7 s, b·T²/2 ≈ 4.3 s, b·T/a ≈ 1.2). 2 GPUs, fp32 KV:
  // slope 0 (halves) 7.93 s, 1.2 7.83 s, 1.6 8.49 s: the ranks run in lock step (sends on the compute
  // stream), so the split matters little; bf16 KV with halves: 3.94 s.
  if (!cuda || cfg.n_sparse == 0) return 0;
  return cfg.kv_dtype == DType::f32 ? 1.2 : 0;
}

namespace {

// The state of exec_order[i] that the next rank needs, as whole tensors in a fixed order. For a sparse
// block, the KV rows [0, len) and the means of the complete chunks.
std::vector<Tensor> block_state(const ModelConfig& c, State& s, size_t i) {
  const BlockRef& b = c.exec_order[i];
  if (b.kind == BlockRef::Kind::rwkv)
    return {s.att_shift[size_t(b.index)], s.wkv[size_t(b.index)], s.ffn_shift[size_t(b.index)]};
  KvCache& kv = s.kv[size_t(b.index)][0];
  std::vector<Tensor> out{s.ffn_shift[size_t(c.n_rwkv + b.index)]};
  if (kv.len > 0) {
    out.push_back(kv.k.rows_view(0, kv.len));
    out.push_back(kv.v.rows_view(0, kv.len));
    out.push_back(kv.chunk_mean.rows_view(0, kv.n_chunks));
  }
  return out;
}

}  // namespace

Tensor context_parallel_prefill(const Model& model, const int32_t* ids, int64_t T, int rank, int world,
                                CpLink* link, State& state, const CpTiming* timing, double cost_slope) {
  const ModelConfig& c = model.config();
  Backend& be = model.backend();
  if (c.eviction.max_len > 0) throw Error("context parallel: KV eviction is not supported (drop --kv-evict-max)");
  if (world > 1 && !link) throw Error("context parallel: no link between the ranks");
  if (rank < 0 || rank >= world) throw Error("context parallel: rank " + std::to_string(rank) + " outside the world");
  for (int64_t t = 0; t < T; ++t)
    if (ids[t] < 0 || ids[t] >= c.n_vocab)
      throw Error("token id " + std::to_string(ids[t]) + " at position " + std::to_string(t) +
                  " is outside the model's vocabulary [0, " + std::to_string(c.n_vocab) + ")");
  const std::vector<CpSegment> plan = plan_segments(T, world, cp_alignment(c), cost_slope);
  const CpSegment seg = plan[size_t(rank)];
  const int64_t n = seg.size(), C = c.n_embd, R = std::max<int64_t>(1, c.max_rows_per_call);
  RWKVX_ASSERT(state.n_slots >= 1 && state.pos[0] == 0, "context parallel: expects a fresh state");

  // The segment's activations stay resident between blocks: x (the residual stream) and v_first.
  Tensor x = be.alloc_uninit(DType::f32, {n, C});
  Tensor v_first = be.alloc(DType::f32, {n, C});
  Tensor xn = be.alloc_uninit(DType::f32, {std::min(n, R), C});
  for (int64_t w0 = 0; w0 < n; w0 += R) {
    const int64_t wn = std::min(R, n - w0);
    Tensor xw = x.rows_view(w0, wn);
    model.embed_rows(ids + seg.begin + w0, wn, xw);
  }
  for (size_t i = 0; i < c.exec_order.size(); ++i) {
    const BlockRef& b = c.exec_order[i];
    if (rank > 0) {  // this block's state after tokens [0, seg.begin), from the previous rank
      if (b.kind == BlockRef::Kind::sparse) {
        KvCache& kv = state.kv[size_t(b.index)][0];
        const int64_t chunk = c.sparse.chunk, cap = (seg.end + chunk - 1) / chunk * chunk;
        kv.k = be.alloc_uninit(kv.dtype, {cap, C});
        kv.v = be.alloc_uninit(kv.dtype, {cap, C});
        kv.chunk_mean = be.alloc(DType::f32, {cap / chunk, C});
        kv.len = seg.begin;
        kv.n_chunks = seg.begin / chunk;
        kv.chunk = chunk;
      }
      for (Tensor& t : block_state(c, state, i)) link->recv(t, rank - 1);
    }
    for (int64_t w0 = 0; w0 < n; w0 += R) {
      const int64_t wn = std::min(R, n - w0);
      Tensor xw = x.rows_view(w0, wn), vw = v_first.rows_view(w0, wn);
      Tensor xnw = xn.rows_view(0, wn);
      model.run_block(i, xw, xnw, vw, SeqBatch::single(wn), state);
    }
    if (rank < world - 1)
      for (const Tensor& t : block_state(c, state, i)) link->send(t, rank + 1);
    if (timing && timing->after_block) timing->after_block(i);
  }
  state.pos[0] = seg.end;
  Tensor logits = be.alloc(DType::f32, {1, c.n_vocab});
  Tensor xl = x.rows_view(n - 1, 1), xnl = xn.rows_view(0, 1);
  model.head_row(xl, xnl, logits);
  return logits;
}

}  // namespace rwkvx
