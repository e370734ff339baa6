// The training ops on an NVIDIA GPU: the same contract as the CPU ops of src/train/ops/ (each function
// here has the CPU function of the same name as its reference and its test oracle), on device pointers,
// enqueued on one CUDA stream. Templated on the scalar: float (training) and double (fp64 finite-
// difference gradient checks on the GPU); both are instantiated.
//
// Conventions, as on the CPU:
//   - activations are row-major [T, C] for one sequence of T tokens starting from a zero state;
//   - backward functions ADD into their outputs (callers zero them once); a null output is skipped;
//   - parameter gradients that sum over tokens are reduced in a fixed order (no float atomics), so a run
//     is bit-for-bit repeatable: exact resume on the GPU depends on it.
// Shapes are not checked here beyond what the kernels need (the model checks them once at load).
#pragma once
#include <cstdint>
#include <vector>

#include <cuda_runtime.h>

namespace rwkvx::train::cuda {

// ---- elementwise (elementwise.h) ----------------------------------------------------------------------
template <class S> void tanh_forward(cudaStream_t st, const S* x, S* y, int64_t n);            // y may alias x
template <class S> void tanh_backward(cudaStream_t st, const S* dy, const S* y, S* dx, int64_t n);
template <class S> void sigmoid_forward(cudaStream_t st, const S* x, S* y, int64_t n);         // y may alias x
template <class S> void sigmoid_backward(cudaStream_t st, const S* dy, const S* y, S* dx, int64_t n);
template <class S> void relu_square_forward(cudaStream_t st, const S* x, S* y, int64_t n);
template <class S> void relu_square_backward(cudaStream_t st, const S* dy, const S* x, S* dx, int64_t n);
// y += x (n elements): residual adds.
template <class S> void add_inplace(cudaStream_t st, S* y, const S* x, int64_t n);
// delta[t] = x[t-1] - x[t], x[-1] = 0 (a fresh sequence).
template <class S> void token_shift_forward(cudaStream_t st, const S* x, S* delta, int64_t T, int64_t C);
template <class S> void token_shift_backward(cudaStream_t st, const S* ddelta, S* dx, int64_t T, int64_t C);
// out = x + delta ⊙ mu (mu [C]);  dx += dout; ddelta += dout ⊙ mu; dmu += Σ_t dout ⊙ delta.
template <class S> void shift_mix_forward(cudaStream_t st, const S* x, const S* delta, const S* mu, S* out, int64_t T,
                                          int64_t C);
template <class S> void shift_mix_backward(cudaStream_t st, const S* dout, const S* delta, const S* mu, S* dx,
                                           S* ddelta, S* dmu, int64_t T, int64_t C);

// ---- norms (norm.h): groups of G channels; G = C is LayerNorm, G = head size the ln_x GroupNorm --------
// mean, rstd: [T · C/G]. x may alias y.
template <class S> void group_norm_forward(cudaStream_t st, const S* x, const S* w, const S* b, S* y, S* mean, S* rstd,
                                           int64_t T, int64_t C, int64_t G, double eps);
template <class S> void group_norm_backward(cudaStream_t st, const S* dy, const S* x, const S* w, const S* mean,
                                            const S* rstd, S* dx, S* dw, S* db, int64_t T, int64_t C, int64_t G);

// ---- RWKV-7 time-mix pieces (rwkv7_time_mix.h) ------------------------------------------------------
template <class S> void wkv_inputs_forward(cudaStream_t st, const S* wl, const S* al, const S* k, const S* w0,
                                           const S* a0, const S* k_k, const S* k_a, S* w, S* a, S* alpha, S* beta,
                                           S* k_out, int64_t T, int64_t C, int64_t N);
template <class S> void wkv_inputs_backward(cudaStream_t st, const S* dw, const S* dalpha, const S* dbeta,
                                            const S* dk_out, const S* wl, const S* al, const S* k, const S* w0,
                                            const S* a0, const S* k_k, const S* k_a, S* dwl, S* dal, S* dk, S* dw0,
                                            S* da0, S* dk_k, S* dk_a, int64_t T, int64_t C, int64_t N);
template <class S> void value_residual_forward(cudaStream_t st, const S* v, const S* v_first, const S* vg, const S* v0,
                                               S* out, int64_t T, int64_t C);
template <class S> void value_residual_backward(cudaStream_t st, const S* dout, const S* v, const S* v_first,
                                                const S* vg, const S* v0, S* dv, S* dv_first, S* dvg, S* dv0,
                                                int64_t T, int64_t C);
// mean, rstd: [T, C/N]. eps: kLnXEps (64e-5).
template <class S> void rwkv7_output_forward(cudaStream_t st, const S* y, const S* r, const S* k, const S* v,
                                             const S* r_k, const S* g, const S* ln_w, const S* ln_b, double eps,
                                             S* out, S* mean, S* rstd, int64_t T, int64_t C, int64_t N);
template <class S> void rwkv7_output_backward(cudaStream_t st, const S* dout, const S* y, const S* r, const S* k,
                                              const S* v, const S* r_k, const S* g, const S* ln_w, const S* ln_b,
                                              const S* mean, const S* rstd, S* dy, S* dr, S* dk, S* dv, S* dr_k,
                                              S* dg, S* dln_w, S* dln_b, int64_t T, int64_t C, int64_t N);

// ---- WKV-7 recurrence (wkv7.h) -------------------------------------------------------------------------
// Snapshots of the state every `save_every` tokens: [wkv7_snapshots(T, save_every), H, N, N] elements
// of S (snapshot n = the state before token n·save_every). Zero start state.
inline int64_t wkv7_snapshots(int64_t T, int64_t save_every) { return (T + save_every - 1) / save_every; }
template <class S> void wkv7_forward(cudaStream_t st, const S* r, const S* w, const S* k, const S* v, const S* alpha,
                                     const S* beta, S* y, S* snapshots, int64_t T, int64_t H, int64_t N,
                                     int64_t save_every);
template <class S> void wkv7_backward(cudaStream_t st, const S* dy, const S* r, const S* w, const S* k, const S* v,
                                      const S* alpha, const S* beta, const S* snapshots, S* dr, S* dw, S* dk, S* dv,
                                      S* dalpha, S* dbeta, int64_t T, int64_t H, int64_t N, int64_t save_every);

// ---- top-k chunk sparse attention (sparse_attention.h, moba_forward / moba_backward) -----------------
// q, k, v, out: [T, C] with heads of D channels. selected: [T, H, top_k - 1] int32 (ascending, -1 where
// fewer chunks exist), lse: [T, H]; both written by the forward, read by the backward. Selection: chunk
// means of k over complete chunks, gate q·mean unscaled, ties to the lower chunk (spec model.md §5).
template <class S> void moba_forward(cudaStream_t st, const S* q, const S* k, const S* v, S* out, int32_t* selected,
                                     S* lse, int64_t T, int64_t C, int64_t D, int64_t chunk, int64_t top_k);
// Which float attention path moba_forward/backward take: 1 the exact CUDA-core one (fp32 arithmetic), 0 the
// bf16 tensor-core one (fp32 accumulation; used when D = 64 and chunk and C are multiples of 64), -1 (the
// default) the environment variable RWKVX_CUDA_TRAIN_EXACT_ATTN decides (set and not "0": exact). double
// is always exact. A process-wide setting: the CUDA train model sets it before each call.
void set_moba_exact_attention(int mode);
template <class S> void moba_backward(cudaStream_t st, const S* dout, const S* q, const S* k, const S* v,
                                      const int32_t* selected, const S* lse, S* dq, S* dk, S* dv, int64_t T,
                                      int64_t C, int64_t D, int64_t chunk, int64_t top_k);

// ---- ends of the model (embedding.h, loss.h) -----------------------------------------------------------
// out[t] = E[ids[t]] (ids on the device, in range).
template <class S> void embedding_forward(cudaStream_t st, const S* E, const int32_t* ids, S* out, int64_t T,
                                          int64_t C);
// dE[id] += Σ_{t: ids[t] = id} dout[t], summed in t order. order/starts: the positions grouped by id, built
// on the host by embedding_grad_plan (device arrays): order [T] = positions sorted by (id, t),
// uniq [n_uniq] = the distinct ids, starts [n_uniq + 1] = where each id's run begins in order.
template <class S> void embedding_backward(cudaStream_t st, const S* dout, const int32_t* order, const int32_t* uniq,
                                           const int32_t* starts, int64_t n_uniq, S* dE, int64_t C);
// Per row t of logits [n, V]: lse[t], loss[t] = lse - logits[t, target] (0 where target < 0), row_max[t];
// sums in double (device arrays of double).
template <class S> void cross_entropy_rows(cudaStream_t st, const S* logits, const int32_t* targets, int64_t n,
                                           int64_t V, double* loss, double* lse, double* row_max);
// In place, per row t: logits[t] ← coef[t] (softmax − onehot(target)) (0 when coef is 0 or target < 0), plus
// for t ≥ l2_first and l2_scale ≠ 0 the L2Wrap gradient max · l2_scale at the first argmax (taken before
// the overwrite). lse, coef: device double [n].
template <class S> void cross_entropy_grad_rows(cudaStream_t st, S* logits, const int32_t* targets, const double* lse,
                                                const double* coef, double l2_scale, int64_t l2_first, int64_t n,
                                                int64_t V);
// Host side of embedding_backward: positions grouped by id, sorted by (id, t).
struct EmbeddingGradPlan {
  std::vector<int32_t> order, uniq, starts;
};
EmbeddingGradPlan embedding_grad_plan(const int32_t* ids, int64_t T);

// ---- optimizer (optimizer.cpp) -------------------------------------------------------------------------
// Σ g² of n floats in double, written to *out (device), in a fixed order.
void sum_squares(cudaStream_t st, const float* g, int64_t n, double* out);
// g *= scale.
void scale_inplace(cudaStream_t st, float* g, int64_t n, double scale);
// One AdamW step (DeepSpeed FusedAdam ADAM_MODE_1, as AdamW::step on the CPU, fp32 master weights):
//   m = β1 m + (1-β1) g;  v = β2 v + (1-β2) g²;  p -= lr ((m / bc1) / (√v / bc2_sqrt + eps) + wd p)
void adamw_update(cudaStream_t st, float* p, const float* g, float* m, float* v, int64_t n, double lr, double wd,
                  double beta1, double beta2, double eps, double bc1, double bc2_sqrt);

}  // namespace rwkvx::train::cuda
