// RWKV-7 time mix and channel mix: the one place to read the RWKV-7 block math (spec model.md §3–4).
// Each step is a call on the backend op contract (src/backend/ops.h), so the same code runs on every
// backend; the step numbers match the spec.
#include "model/model.h"

namespace rwkvx {

// GroupNorm epsilon of ln_x: 1e-5 · head_size_divisor² with the official divisor 8.
constexpr float kLnXEps = 64e-5f;

void rwkv7_time_mix(Backend& be, const TimeMixWeights& w, const ModelConfig& cfg, const Tensor& x, Tensor& shift,
                    Tensor& wkv, const SeqBatch& batch, Tensor& v_first, bool first_block, Tensor& out) {
  const int64_t T = x.rows(), C = cfg.n_embd;
  const int N = int(cfg.head_size);
  // Every activation below is the whole output of the op that first writes it.
  auto act = [&](int64_t cols) { return be.alloc_uninit(DType::f32, {T, cols}); };

  // A GEMM input in the form the backend's GEMMs take it for these weights (f32, or CUDA prefill's bf16x2).
  auto gemm_input = [&](std::initializer_list<const Tensor*> weights) {
    return be.alloc_uninit(be.gemm_input_dtype(std::span(weights.begin(), weights.size()), T), {T, C});
  };

  // 1. Token shift: each projection sees a lerp between x_t and x_{t-1}.
  Tensor xr = gemm_input({&w.receptance}), xw = gemm_input({&w.w1}), xk = gemm_input({&w.key});
  Tensor xv = first_block ? gemm_input({&w.value}) : gemm_input({&w.value, &w.v1});
  Tensor xa = gemm_input({&w.a1}), xg = gemm_input({&w.g1});
  const Tensor* mus[] = {&w.x_r, &w.x_w, &w.x_k, &w.x_v, &w.x_a, &w.x_g};
  Tensor* mixed[] = {&xr, &xw, &xk, &xv, &xa, &xg};
  be.token_shift_mix_n(x, shift, batch, mus, mixed);

  // 2. Projections: r, k, v are full Linear layers; decay, learning rate and gate are low-rank.
  Tensor r = act(C), k = act(C), v = act(C);
  be.linear(xr, w.receptance, r);
  be.linear(xk, w.key, k);
  be.linear(xv, w.value, v);
  Tensor decay = act(C), lr = act(C), gate = act(C);
  Tensor hw = act(cfg.dim_w), ha = act(cfg.dim_a), hg = act(cfg.dim_g);
  be.matmul(xw, w.w1, hw);
  be.tanh_(hw);
  be.matmul(hw, w.w2, decay);  // wl; becomes w in step 6
  be.matmul(xa, w.a1, ha);
  be.matmul(ha, w.a2, lr);     // becomes a = σ(a0 + ·)
  be.matmul(xg, w.g1, hg);
  be.sigmoid_(hg);
  be.matmul(hg, w.g2, gate);   // g = σ(x_g g1) g2

  // 3, 4, 6. Decay, learning rate, normalised removal key kk (α = -kk, β = kk ⊙ a), modified k.
  Tensor alpha = act(C), beta = act(C);
  be.rwkv7_wkv_inputs(decay, lr, k, alpha, beta, w.w0, w.a0, w.k_k, w.k_a, N);

  // 5. Value residual: block 0 publishes its v; later blocks mix towards it.
  if (first_block) {
    be.copy(v, v_first);
  } else {
    Tensor hv = act(cfg.dim_v), vgate = act(C);
    be.matmul(xv, w.v1, hv);
    be.matmul(hv, w.v2, vgate);
    be.rwkv7_value_residual(v, v_first, vgate, w.v0);
  }

  // 7. WKV-7 recurrence over the sequence, carrying the fp32 state.
  Tensor y = act(C);
  be.wkv7(r, decay, k, v, alpha, beta, wkv, batch, y, N);

  // 8–10. Per-head GroupNorm, bonus (r·k·r_k) v, output gate, output projection (added into the residual).
  be.rwkv7_output(y, r, k, v, w.r_k, gate, w.ln_x.weight, w.ln_x.bias, kLnXEps, N);
  be.linear_add(y, w.output, out);
}

void rwkv7_channel_mix(Backend& be, const ChannelMixWeights& w, const Tensor& x, Tensor& shift,
                       const SeqBatch& batch, Tensor& out) {
  const int64_t T = x.rows(), C = x.row_size();
  const Tensor* key[] = {&w.key};
  Tensor kx = be.alloc_uninit(be.gemm_input_dtype(key, T), {T, C});
  const Tensor* mu[] = {&w.x_k};
  Tensor* mixed[] = {&kx};
  be.token_shift_mix_n(x, shift, batch, mu, mixed);
  be.relu_square_ffn(kx, w.key, w.value, out);
}

}  // namespace rwkvx
