// A loaded RWKV-7 or RWKV-X model on one backend: configuration, weights and the forward pass.
// The RWKV-7 block math is in rwkv7.cpp, the sparse-attention block in sparse_block.cpp, and the
// layer schedule in model.cpp.
#pragma once
#include <memory>
#include <string>

#include "backend/ops.h"
#include "model/config.h"
#include "model/state.h"
#include "model/weights.h"

namespace rwkvx {

enum class LogitsMode { none, last, all };

class Model {
 public:
  // Loads a .pth or .safetensors checkpoint; throws rwkvx::Error naming the file and tensor at fault.
  static std::unique_ptr<Model> load(const std::string& path, const ModelOptions& options, Backend& backend);
  static std::unique_ptr<Model> from_store(const TensorStore& store, const ModelOptions& options, Backend& backend);

  const ModelConfig& config() const { return cfg_; }
  Backend& backend() const { return *be_; }
  const ModelWeights& weights() const { return w_; }

  // A zeroed state for `n_slots` sequences.
  State new_state(int n_slots = 1) const;
  // Resets one slot to the start of a sequence.
  void reset_slot(State& state, int slot) const;

  // Runs the rows of `ids` (grouped by `batch`) through the model, advancing each sequence's state.
  // Returns logits [rows, V] for LogitsMode::all, [n_seq, V] (last row of each sequence) for ::last, or
  // an empty tensor for ::none. Token ids are checked first: a bad id throws and leaves the state as it was.
  // Calls of more than config().max_rows_per_call rows run as consecutive windows of that many rows.
  Tensor forward(const int32_t* ids, const SeqBatch& batch, State& state, LogitsMode mode) const;

  // Calls where every sequence has one row go through the backend's whole-step decoder when it offers one
  // (on by default; results equal the op path to fp32 rounding). Off: always op by op.
  void set_step_decoder(bool on) { use_step_decoder_ = on; }
  bool step_decoder_active() const;

  // The layer schedule split open, for runners that go block by block over a whole segment instead of
  // window by window through all blocks (context-parallel prefill, runtime/context_parallel.h).
  // forward_rows is exactly embed_rows, run_block for each entry of config().exec_order, head_row.
  // embed_rows: embedding + ln0 of `n` ids into x [n, C].
  void embed_rows(const int32_t* ids, int64_t n, Tensor& x) const;
  // Block exec_order[i] over the rows of x (in place: x += both residual updates), advancing that block's
  // state (not State::pos). xn: scratch [rows, C]; v_first [rows, C]: written by the first RWKV block,
  // read by the later ones (so it must hold the same rows for every block of a window).
  void run_block(size_t i, Tensor& x, Tensor& xn, Tensor& v_first, const SeqBatch& batch, State& state) const;
  // ln_out + head of one row x_row [1, C] into logits [1, V]; xn_row: scratch [1, C].
  void head_row(const Tensor& x_row, Tensor& xn_row, Tensor& logits) const;

 private:
  Model(ModelConfig cfg, Backend& be) : cfg_(std::move(cfg)), be_(&be) {}
  // One backend pass over all rows of `batch` (already validated).
  Tensor forward_rows(const int32_t* ids, const SeqBatch& batch, State& state, LogitsMode mode) const;
  ModelConfig cfg_;
  Backend* be_;
  ModelWeights w_;
  bool use_step_decoder_ = true;
  mutable bool step_decoder_tried_ = false;
  mutable std::unique_ptr<StepDecoder> step_decoder_;
};

// Block bodies (rwkv7.cpp, sparse_block.cpp). `x` is the block input after its LayerNorm; the block adds
// its residual update into `out` (the residual stream, through Backend::linear_add). State tensors are
// the block's own.
void rwkv7_time_mix(Backend& be, const TimeMixWeights& w, const ModelConfig& cfg, const Tensor& x, Tensor& shift,
                    Tensor& wkv, const SeqBatch& batch, Tensor& v_first, bool first_block, Tensor& out);
void rwkv7_channel_mix(Backend& be, const ChannelMixWeights& w, const Tensor& x, Tensor& shift,
                       const SeqBatch& batch, Tensor& out);
void sparse_attention_block(Backend& be, const SparseBlockWeights& w, const ModelConfig& cfg, const Tensor& x,
                            std::vector<KvCache>& caches, const SeqBatch& batch, Tensor& out);

}  // namespace rwkvx
