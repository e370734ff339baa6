// Training op: the RWKV-7 channel mix (spec model.md §4; the same in RWKV and sparse blocks), forward and
// backward side by side: kx = x + (x_{t-1} - x) ⊙ x_k;  h = relu(kx Wkᵀ)²;  out = h Wvᵀ.
#pragma once
#include <cstdint>
#include <vector>

#include "train/ops/elementwise.h"
#include "train/ops/linear.h"

namespace rwkvx::train {

template <class P>
struct ChannelMixTensors {
  P x_k;    // ffn.x_k [C]
  P key;    // ffn.key.weight [F, C]
  P value;  // ffn.value.weight [C, F]
};

template <class S>
struct ChannelMixSaved {
  std::vector<S> delta, kx, pre, h;  // [T, C], [T, C], [T, F], [T, F]
};

// x: [T, C] ln2 output; out: [T, C].
template <class S>
void channel_mix_forward(const ChannelMixTensors<const S*>& p, const S* x, S* out, ChannelMixSaved<S>& s, int64_t T,
                         int64_t C, int64_t F) {
  s.delta.assign(size_t(T * C), S(0)), s.kx.assign(size_t(T * C), S(0));
  s.pre.assign(size_t(T * F), S(0)), s.h.assign(size_t(T * F), S(0));
  token_shift_forward(x, static_cast<const S*>(nullptr), s.delta.data(), T, C);
  shift_mix_forward(x, s.delta.data(), p.x_k, s.kx.data(), T, C);
  linear_forward(s.kx.data(), p.key, s.pre.data(), T, C, F);
  relu_square_forward(s.pre.data(), s.h.data(), T * F);
  linear_forward(s.h.data(), p.value, out, T, F, C);
}

// dout [T, C] → dx (added) and parameter gradients (added).
template <class S>
void channel_mix_backward(const ChannelMixTensors<const S*>& p, const ChannelMixTensors<S*>& g,
                          const ChannelMixSaved<S>& s, const S* dout, S* dx, int64_t T, int64_t C, int64_t F) {
  std::vector<S> dh(size_t(T * F), S(0)), dpre(size_t(T * F), S(0)), dkx(size_t(T * C), S(0));
  std::vector<S> ddelta(size_t(T * C), S(0));
  linear_backward(dout, s.h.data(), p.value, dh.data(), g.value, T, F, C);
  relu_square_backward(dh.data(), s.pre.data(), dpre.data(), T * F);
  linear_backward(dpre.data(), s.kx.data(), p.key, dkx.data(), g.key, T, C, F);
  shift_mix_backward(dkx.data(), s.delta.data(), p.x_k, dx, ddelta.data(), g.x_k, T, C);
  token_shift_backward(ddelta.data(), dx, T, C);
}

}  // namespace rwkvx::train
