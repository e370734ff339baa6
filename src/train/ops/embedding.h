// Training ops: the two ends of the model (spec model.md §2), forward and backward side by side: the
// embedding lookup (its ln0 LayerNorm is norm.h) and the head, logits = LayerNorm(x; ln_out) @ headᵀ.
// Backward functions ADD into their outputs; a null parameter gradient is skipped.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "train/ops/linear.h"
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

// logits [T, V] = LayerNorm(x; ln_out, eps 1e-5) @ headᵀ; x [T, C].
template <class S>
void head_forward(const HeadTensors<const S*>& p, const S* x, S* logits, HeadSaved<S>& s, int64_t T, int64_t C,
                  int64_t V) {
  s.xo.assign(size_t(T * C), S(0)), s.mean.assign(size_t(T), S(0)), s.rstd.assign(size_t(T), S(0));
  group_norm_forward(x, p.ln_w, p.ln_b, s.xo.data(), s.mean.data(), s.rstd.data(), T, C, C, 1e-5);
  linear_forward(s.xo.data(), p.head, logits, T, C, V);
}
template <class S>
void head_backward(const HeadTensors<const S*>& p, const HeadTensors<S*>& g, const S* x, const HeadSaved<S>& s,
                   const S* dlogits, S* dx, int64_t T, int64_t C, int64_t V) {
  std::vector<S> dxo(size_t(T * C), S(0));
  linear_backward(dlogits, s.xo.data(), p.head, dxo.data(), g.head, T, C, V);
  group_norm_backward(dxo.data(), x, p.ln_w, s.mean.data(), s.rstd.data(), dx, g.ln_w, g.ln_b, T, C, C);
}

}  // namespace rwkvx::train
