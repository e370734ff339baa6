// Training ops: the two ends of the model (spec model.md §2), forward and backward side by side: the
// embedding lookup (its ln0 LayerNorm is norm.h) and the head, logits = LayerNorm(x; ln_out) @ headᵀ,
// fused with the cross-entropy and L2Wrap of spec system.md §4.4 (loss.h).
// Backward functions ADD into their outputs; a null parameter gradient is skipped.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "train/ops/fast.h"
#include "train/ops/linear.h"
#include "train/ops/loss.h"
#include "train/ops/norm.h"

namespace rwkvx::train {

// out[t] = E[ids[t]]; E [V, C], ids checked < V by the caller.
template <class S>
void embedding_forward(const S* E, const int32_t* ids, S* out, int64_t T, int64_t V, int64_t C) {
  for (int64_t t = 0; t < T; ++t) {
    RWKVX_ASSERT(ids[t] >= 0 && ids[t] < V, "embedding: id out of range");
    std::copy(E + int64_t(ids[t]) * C, E + int64_t(ids[t] + 1) * C, out + t * C);
  }
}
// dE[ids[t]] += dout[t].
template <class S>
void embedding_backward(const S* dout, const int32_t* ids, S* dE, int64_t T, int64_t C) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) dE[int64_t(ids[t]) * C + c] += dout[t * C + c];
}

template <class P>
struct HeadTensors {
  P ln_w, ln_b;  // ln_out.weight / .bias [C]
  P head;        // head.weight [V, C]
};

template <class S>
struct HeadSaved {
  std::vector<S> xo, mean, rstd;  // LayerNorm output [T, C] and its statistics [T]
};

// The [rows, V] logits block of the head (64 MB at 256 × 65536). float: one buffer per thread, kept
// between calls, since allocating it afresh cost page faults and zeroing on every forward and backward
// (its contents are always overwritten); double (gradient checks): `own`, sized here.
template <class S>
S* head_block_buffer(std::vector<S>& own, int64_t n) {
  if constexpr (std::is_same_v<S, float>) {
    thread_local std::vector<float> buf;
    if (int64_t(buf.size()) < n) buf.resize(size_t(n));
    return buf.data();
  }
  own.resize(size_t(n));
  return own.data();
}

// The head with the loss fused, in blocks of `rows` positions so that no [T, V] array is ever kept (at a
// 64K context and V = 65536 the logits alone would take 17 GB); the backward recomputes each block.
// logits = LayerNorm(x; ln_out, eps 1e-5) @ headᵀ, x [T, C]. Per row: loss (CE, 0 where target < 0), lse,
// and the row maximum (for the L2Wrap penalty). `logits` [T, V]: filled when not null.
template <class S>
void head_loss_forward(const HeadTensors<const S*>& p, const S* x, const int32_t* targets, HeadSaved<S>& s,
                       double* loss, double* lse, double* row_max, S* logits, int64_t T, int64_t C, int64_t V,
                       int64_t rows = 256) {
  s.xo.assign(size_t(T * C), S(0)), s.mean.assign(size_t(T), S(0)), s.rstd.assign(size_t(T), S(0));
  group_norm_forward(x, p.ln_w, p.ln_b, s.xo.data(), s.mean.data(), s.rstd.data(), T, C, C, 1e-5);
  std::vector<S> blk_d;
  S* blk = nullptr;
  if (!logits) blk = head_block_buffer<S>(blk_d, std::min(rows, T) * V);
  for (int64_t r0 = 0; r0 < T; r0 += rows) {
    const int64_t n = std::min(rows, T - r0);
    S* L = logits ? logits + r0 * V : blk;
    linear_forward(s.xo.data() + r0 * C, p.head, L, n, C, V);
    if constexpr (std::is_same_v<S, float>) {
      fast::cross_entropy_rows(L, targets + r0, n, V, loss + r0, lse + r0, row_max + r0);
      continue;
    }
    cross_entropy_forward(L, targets + r0, n, V, loss + r0, lse + r0);
    for (int64_t t = 0; t < n; ++t) row_max[r0 + t] = double(*std::max_element(L + t * V, L + (t + 1) * V));
  }
}

// dlogits[t] = coef[t] (softmax - onehot(target)) plus, on rows t ≥ l2_first, the L2Wrap gradient
// max · l2_scale at the argmax (l2_scale 0: none); then through the projection and ln_out into dx (added)
// and the parameter gradients (added; null skipped).
template <class S>
void head_loss_backward(const HeadTensors<const S*>& p, const HeadTensors<S*>& g, const S* x, const HeadSaved<S>& s,
                        const int32_t* targets, const double* lse, const double* coef, double l2_scale,
                        int64_t l2_first, S* dx, int64_t T, int64_t C, int64_t V, int64_t rows = 256) {
  std::vector<S> dxo(size_t(T * C), S(0));
  if constexpr (std::is_same_v<S, float>) {
    // The logit gradient overwrites the recomputed logits in place (one [rows, V] buffer, not two).
    std::vector<float> unused;
    float* blk = head_block_buffer<float>(unused, std::min(rows, T) * V);
    for (int64_t r0 = 0; r0 < T; r0 += rows) {
      const int64_t n = std::min(rows, T - r0);
      const float* xo = s.xo.data() + r0 * C;
      fast::gemm(false, true, n, V, C, xo, C, p.head, C, blk, V, false);
      fast::cross_entropy_grad_rows(blk, targets + r0, lse + r0, coef + r0, l2_scale, l2_first - r0, n, V);
      fast::gemm(false, false, n, C, V, blk, V, p.head, C, dxo.data() + r0 * C, C, true);
      if (g.head) fast::gemm(true, false, V, C, n, blk, V, xo, C, g.head, C, true);
    }
    group_norm_backward(dxo.data(), x, p.ln_w, s.mean.data(), s.rstd.data(), dx, g.ln_w, g.ln_b, T, C, C);
    return;
  }
  std::vector<S> blk(size_t(std::min(rows, T) * V)), dblk(blk.size());
  for (int64_t r0 = 0; r0 < T; r0 += rows) {
    const int64_t n = std::min(rows, T - r0);
    linear_forward(s.xo.data() + r0 * C, p.head, blk.data(), n, C, V);
    std::fill(dblk.begin(), dblk.end(), S(0));
    cross_entropy_backward(blk.data(), targets + r0, lse + r0, coef + r0, dblk.data(), n, V);
    if (l2_scale != 0) {
      const int64_t first = std::clamp<int64_t>(l2_first - r0, 0, n);
      l2wrap_backward(blk.data() + first * V, n - first, V, l2_scale, dblk.data() + first * V);
    }
    linear_backward(dblk.data(), s.xo.data() + r0 * C, p.head, dxo.data() + r0 * C, g.head, n, C, V);
  }
  group_norm_backward(dxo.data(), x, p.ln_w, s.mean.data(), s.rstd.data(), dx, g.ln_w, g.ln_b, T, C, C);
}

}  // namespace rwkvx::train
