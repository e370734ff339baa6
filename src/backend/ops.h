// The op contract every compute backend implements (reference fp32 loops, fast CPU, CUDA). Model code
// (src/model) builds RWKV-7 and sparse-attention blocks only from these calls; backends never see model
// or runtime types. Each op states shapes, dtypes and layout once, here. Activations are fp32 [rows, C]
// row-major; weights are whatever upload_weight produced (the backend's choice of stored precision).
//
// Batching: the rows of one call may belong to several sequences (continuous batching, batched decode).
// A SeqBatch says which rows belong to which sequence and which state slot that sequence owns; state
// tensors carry a leading slot dimension. A single-sequence call is a SeqBatch with one entry.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "backend/tensor.h"
#include "model/formats/tensor_store.h"

namespace rwkvx {

struct SeqBatch {
  std::vector<int64_t> row_start;  // n_seq + 1 entries; sequence s owns rows [row_start[s], row_start[s+1])
  std::vector<int32_t> slot;       // n_seq entries; state slot of sequence s
  int64_t n_seq() const { return int64_t(slot.size()); }
  int64_t n_rows() const { return row_start.empty() ? 0 : row_start.back(); }
  static SeqBatch single(int64_t n_rows, int32_t slot = 0) { return SeqBatch{{0, n_rows}, {slot}}; }
};

// Keys and values of one sparse-attention layer for one sequence, in cache-slot order. Without eviction
// the slot of a token is its absolute position, so chunk n = slots [n·chunk, (n+1)·chunk) (spec §5.1).
struct KvCache {
  DType dtype = DType::f32;  // storage precision of k and v (f32 or bf16: rounded once at kv_append);
                             // chosen before the first append, all reads widen to fp32
  Tensor k, v;            // [capacity, C] of `dtype`; rows [0, len) valid
  Tensor chunk_mean;      // [capacity / chunk, C] fp32; rows [0, n_chunks) = mean of the stored k over each complete chunk
  int64_t len = 0;
  int64_t n_chunks = 0;
  int64_t chunk = 0;      // chunk size the means were computed with
};

struct SparseAttnParams {
  int chunk = 2048;    // c: chunk size in slots
  int top_k = 3;       // k: chunks attended per query = own chunk + top-(k-1) past chunks, per head
  int head_dim = 64;   // D; heads = C / D
};

// The official bounded-memory policy (spec §7.4), applied at the start of a call when enabled.
struct KvEvictionParams {
  int64_t max_len = 0;      // M: evict when the cache holds more than M rows; 0 = never (the default)
  int64_t window = 2000;    // W: newest rows always kept, in order
  int64_t min_len = 16000;  // Mn: rows kept after eviction (Mn - W chosen by attention votes, per head)
};

// ---- optional whole-step decoder ---------------------------------------------------------------------
// A backend may offer a decode step for the whole model at once (the CUDA backend: fused kernels replayed
// as a CUDA graph). It sees model types only through these forward declarations; Model::forward uses it for
// calls where every sequence has exactly one row, and falls back to the op path when it is absent or
// declines a step. It must compute what the op path computes (same state updates, same logits).
struct ModelConfig;
struct ModelWeights;
struct State;

class StepDecoder {
 public:
  virtual ~StepDecoder() = default;
  // One token for each sequence of `batch` (every sequence has one row; ids [n_seq]). Advances the state's
  // token shifts, WKV states and KV caches (not State::pos: the caller does that) and returns logits
  // [n_seq, V] in `logits`. Returns false, having changed nothing, when it cannot run this step.
  virtual bool step(const int32_t* ids, const SeqBatch& batch, State& state, Tensor& logits) = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // Rows per model forward call that suit this backend; longer calls run in windows of this many rows.
  // CPU: activations of 512 rows stay in cache. A GPU wants fewer, larger launches.
  virtual int64_t preferred_rows_per_call() const { return 512; }
  // The device's own ceilings, measured now, for benchmarks to compare against: memory bandwidth (GB/s)
  // and dense matrix throughput (GFLOP/s) in the precision the backend's GEMMs use. A backend without a
  // measurement of its own returns zeros (the CPU's floors come from runtime/benchmark.h).
  struct DeviceFloors {
    double mem_gbps = 0, matrix_gflops = 0;
    std::string how;  // what was timed, for the report
  };
  virtual DeviceFloors measure_floors() { return {}; }

  // ---- memory -------------------------------------------------------------------------------------
  virtual Tensor alloc(DType dtype, std::initializer_list<int64_t> shape) = 0;  // zero-filled
  // Contents undefined: for an op's output that the op writes whole (saves the zero-fill, a full memory pass).
  virtual Tensor alloc_uninit(DType dtype, std::initializer_list<int64_t> shape) { return alloc(dtype, shape); }
  // A checkpoint tensor in the backend's weight format; `shape` reinterprets it (same numel).
  virtual Tensor upload_weight(const StoredTensor& src, std::initializer_list<int64_t> shape) = 0;
  virtual void to_host(const Tensor& src, float* dst) = 0;    // src fp32, or bf16 (widened exactly)
  virtual void from_host(const float* src, Tensor& dst) = 0;  // dst fp32, or bf16 (rounded to nearest even)
  virtual void copy(const Tensor& src, Tensor& dst) = 0;            // same dtype and numel
  virtual void fill_zero(Tensor& t) = 0;

  // ---- dense ops ----------------------------------------------------------------------------------
  // The dtype in which this backend's GEMMs (linear, linear_add, matmul, relu_square_ffn's x) best take an
  // activation of `rows` rows that is multiplied by each of `weights`: f32 (the default, and always
  // accepted), or bf16x2 (core/dtype.h), which then token_shift_mix_n may write and the GEMMs read without a
  // conversion pass of their own. Only ops that say so accept bf16x2.
  virtual DType gemm_input_dtype(std::span<const Tensor* const> weights, int64_t rows) const {
    (void)weights, (void)rows;
    return DType::f32;
  }
  // out[t] = E[ids[t]]; E [V, C] weight, ids n host ints (checked < V by the caller), out [n, C].
  virtual void embedding(const Tensor& E, const int32_t* ids, int64_t n, Tensor& out) = 0;
  // out[t] = (x[t] - mean) / sqrt(var + eps) * w + b over the last dim; biased variance. x may alias out.
  virtual void layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& out) = 0;
  // out = x @ Wᵀ; x [T, in], W [out, in] (torch Linear layout), out [T, out].
  virtual void linear(const Tensor& x, const Tensor& W, Tensor& out) = 0;
  // out = x @ W; x [T, in], W [in, out] (the low-rank matrices, used as stored), out [T, out].
  virtual void matmul(const Tensor& x, const Tensor& W, Tensor& out) = 0;
  // In place, elementwise.
  virtual void tanh_(Tensor& x) = 0;
  virtual void sigmoid_(Tensor& x) = 0;
  virtual void relu_square_(Tensor& x) = 0;         // max(x, 0)²
  virtual void add_(Tensor& x, const Tensor& y) = 0;  // x += y, same shape
  // out += x @ Wᵀ (a block's output projection into the residual stream). The default is linear into a
  // temporary and add_; backends whose GEMMs can accumulate into out skip the temporary and the extra pass.
  virtual void linear_add(const Tensor& x, const Tensor& W, Tensor& out) {
    Tensor tmp = alloc_uninit(DType::f32, {out.rows(), out.row_size()});
    linear(x, W, tmp);
    add_(out, tmp);
  }
  // The ReLU² feed-forward of a channel mix: out += relu(x @ keyᵀ)² @ valueᵀ; key [F, C], value [C, F].
  // The default is linear, relu_square_, linear_add; a backend may square while preparing the second
  // product's operand instead of in a pass of its own.
  virtual void relu_square_ffn(const Tensor& x, const Tensor& key, const Tensor& value, Tensor& out) {
    Tensor h = alloc_uninit(DType::f32, {x.rows(), key.rows()});
    linear(x, key, h);
    relu_square_(h);
    linear_add(h, value, out);
  }

  // ---- token shift ----------------------------------------------------------------------------------
  // For each sequence s: prev(t) = x[t-1] inside the sequence, shift[slot[s]] for its first row.
  // delta[t] = prev(t) - x[t]; then shift[slot[s]] = x[last row of s]. x, delta [T, C]; shift [slots, C].
  virtual void token_shift(const Tensor& x, Tensor& shift, const SeqBatch& batch, Tensor& delta) = 0;
  // out[t] = x[t] + delta[t] ⊙ mu; mu [C]. (The lerp of every token-shift mix.)
  virtual void shift_mix(const Tensor& x, const Tensor& delta, const Tensor& mu, Tensor& out) = 0;
  // token_shift, then shift_mix with each of mus into the matching outs (a time mix's six mixes, a channel
  // mix's one), without delta. The default runs them one by one through a temporary delta; a backend may
  // read x once and never write delta. An out may be bf16x2 where gemm_input_dtype offers it.
  virtual void token_shift_mix_n(const Tensor& x, Tensor& shift, const SeqBatch& batch,
                                 std::span<const Tensor* const> mus, std::span<Tensor* const> outs) {
    Tensor delta = alloc_uninit(DType::f32, {x.rows(), x.row_size()});
    token_shift(x, shift, batch, delta);
    for (size_t i = 0; i < mus.size(); ++i) shift_mix(x, delta, *mus[i], *outs[i]);
  }

  // ---- RWKV-7 time mix pieces (spec §3) -------------------------------------------------------------
  // In place on [T, C] rows, per head of `head_size`:
  //   w ← exp(-e^{-1/2} σ(w0 + w))            (decay; w enters as the LoRA output)
  //   a ← σ(a0 + a)                            (in-context learning rate; a enters as the LoRA output)
  //   kk = normalize_per_head(k ⊙ k_k);  alpha ← -kk;  beta ← kk ⊙ a
  //   k ← k ⊙ (1 + (a - 1) ⊙ k_a)
  // w0, a0, k_k, k_a: [C]. alpha, beta: outputs [T, C].
  virtual void rwkv7_wkv_inputs(Tensor& w, Tensor& a, Tensor& k, Tensor& alpha, Tensor& beta, const Tensor& w0,
                                const Tensor& a0, const Tensor& k_k, const Tensor& k_a, int head_size) = 0;
  // v ← v + (v_first - v) ⊙ σ(v0 + v_gate); v_gate enters as the LoRA output. All [T, C], v0 [C].
  virtual void rwkv7_value_residual(Tensor& v, const Tensor& v_first, const Tensor& v_gate, const Tensor& v0) = 0;
  // WKV-7 recurrence per sequence and head; state [slots, H, N, N] fp32 with S[i = value][j = key]:
  //   sa_i = Σ_j S_ij α_j;  S_ij = S_ij w_j + sa_i β_j + v_i k_j;  y_i = Σ_j S_ij r_j
  // r, w, k, v, alpha, beta, y: [T, H·N].
  virtual void wkv7(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& alpha,
                    const Tensor& beta, Tensor& state, const SeqBatch& batch, Tensor& y, int head_size) = 0;
  // y ← (GroupNorm_H(y; ln_w, ln_b, eps) + (Σ_j r_j k_j r_k[h,j]) v_h) ⊙ g, per head; r_k [H, N].
  virtual void rwkv7_output(Tensor& y, const Tensor& r, const Tensor& k, const Tensor& v, const Tensor& r_k,
                            const Tensor& g, const Tensor& ln_w, const Tensor& ln_b, float eps, int head_size) = 0;

  // ---- sparse attention (spec §5) -------------------------------------------------------------------
  // Appends k, v rows [T, C] to the cache (growing it) and stores the means of chunks completed by them.
  virtual void kv_append(KvCache& cache, const Tensor& k, const Tensor& v, int chunk) = 0;
  // Queries q [T, C] are the last T slots of the cache. For each query slot t and head h: own chunk
  // j = ⌊t/c⌋; past chunks n < j scored q·mean_n (fp32 gate, unscaled); the top min(k-1, j) per head
  // (ties: lower n) plus own-chunk slots j·c..t form one softmax(q·k/√D) over which v is averaged.
  // out [T, C].
  virtual void sparse_attention(const Tensor& q, const KvCache& cache, const SparseAttnParams& p, Tensor& out) = 0;
  // The official eviction policy (spec §7.4), run before appending a call's keys: if cache.len > max_len,
  // keep the newest `window` rows and, per head, the (min_len - window) older rows with the largest
  // attention votes Σ_q softmax(q·k/√D) from this call's queries q [T, C], in descending-vote order;
  // chunk means are recomputed over the new slot order.
  virtual void kv_evict(KvCache& cache, const Tensor& q, const KvEvictionParams& e, const SparseAttnParams& p) = 0;

  // A whole-step decoder for this model, or nullptr (the default: decode runs op by op).
  virtual std::unique_ptr<StepDecoder> make_step_decoder(const ModelConfig&, const ModelWeights&) { return nullptr; }
};

// The fp32 reference backend: plain loops, the oracle for every other backend's tests.
std::unique_ptr<Backend> make_reference_backend();

}  // namespace rwkvx
