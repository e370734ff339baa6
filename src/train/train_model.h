// A trainable RWKV-7 / RWKV-X model on the CPU: parameters by official tensor name (loaded from a
// checkpoint, written back to .safetensors), the whole forward over one sequence with saved activations
// (or per-block recomputation), the losses of spec system.md §4.4 (cross-entropy with L2Wrap, LongCE,
// the SFT masked mean) and the full backward. The math is the training op layer (src/train/ops/), so a
// CUDA version can replace the ops and keep this schedule. The forward equals the inference engine's
// (spec model.md §2–§5): a fresh sequence from position 0, chunks anchored there.
//
// Scalar type S: float for training, double for finite-difference gradient checks.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/formats/safetensors_writer.h"
#include "model/formats/tensor_store.h"
#include "model/random_init.h"
#include "train/ops/loss.h"

namespace rwkvx::train {

struct TrainParam {
  std::string name;
  std::vector<int64_t> shape;  // as stored in the checkpoint ([1, 1, C] coefficients keep that shape)
  int64_t numel = 0;
  bool trainable = true;       // false: frozen (no gradient is computed, the optimizer skips it)
};

enum class LossKind { ce, longce };
// mean_all: Σ_t w_t ℓ_t / (B·T) (pretraining, LongCE); mean_valid: Σ_t ℓ_t / (B·max(1, #targets ≥ 0)) (SFT).
enum class LossReduction { mean_all, mean_valid };

struct LossOptions {
  LossKind kind = LossKind::ce;
  LossReduction reduction = LossReduction::mean_all;
  bool l2wrap = true;          // add the L2Wrap gradient (scale 1e-4 / (B·T)), spec §4.4
  int64_t batch_size = 1;      // B: this sequence is one of B in the batch (gradients add up over calls)
  LongCeParams longce;         // used when kind == longce
  int64_t pad_multiple = 0;    // left-pad with pad_id to a multiple (official training: 16, §4.3); 0 = off
  int32_t pad_id = 261;
};

struct LossReport {
  double loss = 0;     // this sequence's part of the batch loss (L2Wrap excluded, as officially logged)
  double mean_ce = 0;  // plain mean CE over the scored positions (LongCE: the unweighted value)
  int64_t n_scored = 0;
};

inline constexpr double kLnEps = 1e-5;      // every LayerNorm (spec model.md §2)
inline constexpr double kL2WrapCoef = 1e-4;  // L2Wrap factor before the 1/(B·T) (spec system.md §4.4)

// The loss of one (left-padded) pass from its per-position CE: coef[Tp] = wts / denominator on scored
// positions (0 elsewhere), the report, and (when not null) the objective with the L2Wrap penalty from the
// row maxima. targets, loss, row_max: [Tp] padded; wts: [T] weights of the unpadded positions; P pads.
// Shared by the CPU and CUDA models.
LossReport score_positions(const std::vector<int32_t>& targets, const std::vector<double>& loss,
                           const std::vector<double>& row_max, int64_t P, const double* wts, int64_t T,
                           const LossOptions& opt, std::vector<double>& coef, double* objective);

// Checks a sequence against a vocabulary of V tokens (ids in range, targets < V, the pad token when padding)
// and left-pads it (spec system.md §4.3): returns P, the pads in front; ids_p / targets_p get T + P entries
// (pads: opt.pad_id and target -1; targets null: all -1). Errors name the position. Shared by the CPU and
// CUDA models.
int64_t pad_sequence(const int32_t* ids, const int32_t* targets, int64_t T, int64_t V, const LossOptions& opt,
                     std::vector<int32_t>& ids_p, std::vector<int32_t>& targets_p);

template <class S>
class TrainModelT {
 public:
  // Parameters of a checkpoint (any stored dtype, converted exactly); `options` sets chunk and top-k.
  static TrainModelT from_store(const TensorStore& store, const ModelOptions& options);
  static TrainModelT load(const std::string& path, const ModelOptions& options);
  static TrainModelT random(const RandomModelSpec& spec, const ModelOptions& options);

  // Mutable so tests can use small sparse heads (config().sparse.head_dim) on tiny models.
  ModelConfig& config() { return cfg_; }
  const ModelConfig& config() const { return cfg_; }

  size_t n_params() const { return params_.size(); }
  const TrainParam& param(size_t i) const { return params_[i]; }
  std::vector<S>& value(size_t i) { return values_[i]; }
  const std::vector<S>& value(size_t i) const { return values_[i]; }
  std::vector<S>& grad(size_t i) { return grads_[i]; }
  const std::vector<S>& grad(size_t i) const { return grads_[i]; }
  // Index of a tensor by checkpoint name; throws rwkvx::Error if absent.
  size_t index(const std::string& name) const;
  std::vector<S>& value(const std::string& name) { return values_[index(name)]; }
  std::vector<S>& grad(const std::string& name) { return grads_[index(name)]; }

  void zero_grad();
  void set_trainable(const std::function<bool(const std::string&)>& pred);
  // Stage 1 (spec §4.5, --only_train_moba): every rwkv.* tensor frozen, every moba.* tensor trainable.
  void freeze_all_but_sparse();

  // The parameters as checkpoint tensors (official names and shapes), stored as f32 or bf16.
  std::vector<TensorData> to_tensor_data(DType dtype) const;
  void save_safetensors(const std::string& path, DType dtype) const;

  // Forward only: logits [T, V] of a fresh sequence (no padding).
  std::vector<S> logits(const int32_t* ids, int64_t T) const;
  // Forward only: ℓ_t = CE(logits[t], targets[t]) (0 where targets[t] < 0), with opt's padding.
  std::vector<double> position_losses(const int32_t* ids, const int32_t* targets, int64_t T,
                                      const LossOptions& opt) const;
  // LongCE weights of every position (1 outside the scored windows), spec §4.4.
  std::vector<double> longce_weights(const int32_t* ids, const int32_t* targets, int64_t T,
                                     const LossOptions& opt) const;

  // Forward, loss, backward: ADDs this sequence's gradient to grad(i) of every trainable tensor.
  // ids, targets: [T] (targets[t] is the token after ids[t]; < 0 = not scored).
  LossReport forward_backward(const int32_t* ids, const int32_t* targets, int64_t T, const LossOptions& opt);
  // The same with given constant per-position weights (LongCE with precomputed weights; null = 1).
  LossReport forward_backward_weighted(const int32_t* ids, const int32_t* targets, const double* weights, int64_t T,
                                       const LossOptions& opt);
  // The function whose gradient forward_backward_weighted computes: Σ_t coef_t ℓ_t + (L2Wrap on) the
  // penalty 1e-4/(B·T) Σ_t ½ max_v logits[t, v]². For finite-difference checks.
  double objective(const int32_t* ids, const int32_t* targets, const double* weights, int64_t T,
                   const LossOptions& opt) const;

  // Activation memory: false keeps every block's activations from the forward; true keeps only each
  // block's input and recomputes the block in the backward (the official --grad_cp 1).
  bool recompute = false;
  // WKV state snapshot interval inside each time mix (backward recomputes within a segment).
  int64_t wkv_save_every = 16;

 private:
  struct BlockSaved;
  struct Pass;
  TrainModelT() = default;
  void init_from_store(const TensorStore& store, const ModelOptions& options);
  // The model over ids (left-padded per opt): CE per position, with `keep` the activations, with
  // `keep_logits` the [T, V] logits (otherwise never held whole).
  void forward_pass(const int32_t* ids, const int32_t* targets, int64_t T, const LossOptions& opt, bool keep,
                    bool keep_logits, Pass& p) const;
  // Per-position loss coefficients (weights / denominator), the report and the objective of a pass.
  LossReport score(const Pass& p, const int32_t* ids, const int32_t* targets, const double* weights, int64_t T,
                   const LossOptions& opt, std::vector<double>& coef, double* objective) const;
  // LongCE weights of the scored windows into wts[T], given ℓ_full[T] (spec system.md §4.4).
  void longce_fill(const int32_t* ids, const int32_t* targets, int64_t T, const LossOptions& opt,
                   const double* loss_full, double* wts) const;
  void backward_pass(Pass& p, const std::vector<double>& coef, const LossOptions& opt, int64_t T);
  LossReport step(const int32_t* ids, const int32_t* targets, const double* weights, int64_t T,
                  const LossOptions& opt);
  void block_forward(size_t b, std::vector<S>& x, std::vector<S>& v_first, BlockSaved& s, int64_t T) const;
  void block_backward(size_t b, BlockSaved& s, const std::vector<S>& v_first, std::vector<S>& dx,
                      std::vector<S>& dv_first, int64_t T);
  const S* w(const std::string& name) const { return values_[index(name)].data(); }
  S* g(const std::string& name) {
    const size_t i = index(name);
    return params_[i].trainable ? grads_[i].data() : nullptr;
  }

  ModelConfig cfg_;
  std::vector<TrainParam> params_;
  std::vector<std::vector<S>> values_, grads_;
  std::vector<std::pair<std::string, size_t>> by_name_;  // sorted
};

using TrainModel = TrainModelT<float>;

}  // namespace rwkvx::train
