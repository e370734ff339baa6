// TrainModel: parameters, the layer schedule of the training forward and backward (spec model.md §2,
// system.md §4.3–4.4). The per-op math lives in src/train/ops/; this file only wires blocks together,
// keeps or recomputes activations, and turns logits into the loss gradient.
#include "train/train_model.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/mapped_file.h"
#include "train/block_tensors.h"
#include "train/ops/channel_mix.h"
#include "train/ops/elementwise.h"
#include "train/ops/embedding.h"
#include "train/ops/linear.h"
#include "train/ops/norm.h"
#include "train/ops/rwkv7_time_mix.h"
#include "train/ops/sparse_attention.h"

namespace rwkvx::train {


template <class S>
struct TrainModelT<S>::BlockSaved {
  std::vector<S> x_in;  // the block's residual input: always kept (recompute starts from it)
  std::vector<S> xn1, ln1_mean, ln1_rstd, x_mid, xn2, ln2_mean, ln2_rstd;
  TimeMixSaved<S> tm;
  SparseAttnSaved<S> sa;
  ChannelMixSaved<S> cm;
  void release() {
    const std::vector<S> keep = std::move(x_in);
    *this = BlockSaved{};
    x_in = keep;
  }
};

// One forward over a (left-padded) sequence: what the loss and the backward need.
template <class S>
struct TrainModelT<S>::Pass {
  int64_t P = 0, Tp = 0;                     // pad positions in front, padded length
  std::vector<int32_t> ids, targets;         // padded; pad targets are -1
  std::vector<S> e, ln0_mean, ln0_rstd;      // embedding rows before ln0
  std::vector<S> v_first;                    // [Tp, C], written by RWKV block 0
  std::vector<S> x_final;                    // input of the head
  HeadSaved<S> head;
  std::vector<BlockSaved> blocks;
  std::vector<S> logits;                     // [Tp, V], only when asked for (logits())
  std::vector<double> loss, lse, row_max;    // [Tp] CE per position (0 where not scored), logsumexp, max
};


// ---- parameters ------------------------------------------------------------------------------------

template <class S>
void TrainModelT<S>::init_from_store(const TensorStore& store, const ModelOptions& options) {
  cfg_ = infer_config(store, options);
  for (const TensorSpec& spec : expected_tensors(cfg_)) {
    const StoredTensor& t = store.get(spec.name);
    params_.push_back(TrainParam{spec.name, t.shape, t.numel(), true});
    const std::vector<float> f = t.to_f32();
    values_.emplace_back(f.begin(), f.end());
    grads_.emplace_back(f.size(), S(0));
  }
  for (size_t i = 0; i < params_.size(); ++i) by_name_.emplace_back(params_[i].name, i);
  std::sort(by_name_.begin(), by_name_.end());
}

template <class S>
TrainModelT<S> TrainModelT<S>::from_store(const TensorStore& store, const ModelOptions& options) {
  TrainModelT m;
  m.init_from_store(store, options);
  return m;
}

template <class S>
TrainModelT<S> TrainModelT<S>::load(const std::string& path, const ModelOptions& options) {
  return from_store(load_checkpoint(path), options);
}

template <class S>
TrainModelT<S> TrainModelT<S>::random(const RandomModelSpec& spec, const ModelOptions& options) {
  auto file = MappedFile::from_bytes("random-model.safetensors", serialize_safetensors(make_random_model(spec)));
  return from_store(parse_safetensors(file), options);
}

template <class S>
size_t TrainModelT<S>::index(const std::string& name) const {
  auto it = std::lower_bound(by_name_.begin(), by_name_.end(), std::make_pair(name, size_t(0)));
  if (it == by_name_.end() || it->first != name) throw Error("train model: no tensor '" + name + "'");
  return it->second;
}

template <class S>
void TrainModelT<S>::zero_grad() {
  for (auto& g : grads_) std::fill(g.begin(), g.end(), S(0));
}

template <class S>
void TrainModelT<S>::set_trainable(const std::function<bool(const std::string&)>& pred) {
  for (TrainParam& p : params_) p.trainable = pred(p.name);
}

template <class S>
void TrainModelT<S>::freeze_all_but_sparse() {
  set_trainable([](const std::string& n) { return n.starts_with("moba."); });
}

template <class S>
std::vector<TensorData> TrainModelT<S>::to_tensor_data(DType dtype) const {
  std::vector<TensorData> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::vector<float> f(values_[i].begin(), values_[i].end());
    out.push_back(make_tensor_data(params_[i].name, dtype, params_[i].shape, f));
  }
  return out;
}

template <class S>
void TrainModelT<S>::save_safetensors(const std::string& path, DType dtype) const {
  rwkvx::save_safetensors(path, to_tensor_data(dtype));
}

// ---- forward ---------------------------------------------------------------------------------------

template <class S>
void TrainModelT<S>::block_forward(size_t b, std::vector<S>& x, std::vector<S>& v_first, BlockSaved& s,
                                   int64_t T) const {
  const BlockRef& br = cfg_.exec_order[b];
  const bool rwkv = br.kind == BlockRef::Kind::rwkv;
  const int64_t C = cfg_.n_embd, F = cfg_.n_ffn, TC = T * C;
  const std::string name = block_prefix(cfg_, br);
  auto get = [&](const std::string& n) -> const S* { return w(n); };
  s.x_in = x;
  s.xn1.assign(size_t(TC), S(0)), s.ln1_mean.assign(size_t(T), S(0)), s.ln1_rstd.assign(size_t(T), S(0));
  group_norm_forward(x.data(), w(name + "ln1.weight"), w(name + "ln1.bias"), s.xn1.data(), s.ln1_mean.data(),
                     s.ln1_rstd.data(), T, C, C, kLnEps);
  std::vector<S> out(static_cast<size_t>(TC));
  if (rwkv) {
    const TimeMixShape sh{T, C, cfg_.head_size, cfg_.dim_w, cfg_.dim_a, cfg_.dim_v, cfg_.dim_g, br.index == 0};
    time_mix_forward(time_mix_tensors(get, name, br.index == 0), sh, s.xn1.data(), v_first.data(), out.data(), s.tm,
                     wkv_save_every);
  } else {
    const MobaShape sh{T, C, cfg_.sparse.head_dim, cfg_.sparse.chunk, cfg_.sparse.top_k};
    sparse_attn_forward(sparse_attn_tensors(get, name), sh, s.xn1.data(), out.data(), s.sa);
  }
  for (int64_t i = 0; i < TC; ++i) x[size_t(i)] += out[size_t(i)];
  s.x_mid = x;
  s.xn2.assign(size_t(TC), S(0)), s.ln2_mean.assign(size_t(T), S(0)), s.ln2_rstd.assign(size_t(T), S(0));
  group_norm_forward(x.data(), w(name + "ln2.weight"), w(name + "ln2.bias"), s.xn2.data(), s.ln2_mean.data(),
                     s.ln2_rstd.data(), T, C, C, kLnEps);
  channel_mix_forward(channel_mix_tensors(get, name), s.xn2.data(), out.data(), s.cm, T, C, F);
  for (int64_t i = 0; i < TC; ++i) x[size_t(i)] += out[size_t(i)];
}

// ---- the whole step ----------------------------------------------------------------------------------

template <class S>
void TrainModelT<S>::block_backward(size_t b, BlockSaved& s, const std::vector<S>& v_first, std::vector<S>& dx,
                                    std::vector<S>& dv_first, int64_t T) {
  const BlockRef& br = cfg_.exec_order[b];
  const bool rwkv = br.kind == BlockRef::Kind::rwkv;
  const int64_t C = cfg_.n_embd, F = cfg_.n_ffn, TC = T * C;
  const std::string name = block_prefix(cfg_, br);
  if (recompute) {
    std::vector<S> x = s.x_in, vf = v_first;
    block_forward(b, x, vf, s, T);
  }
  auto get = [&](const std::string& n) -> const S* { return w(n); };
  auto gget = [&](const std::string& n) -> S* { return g(n); };
  std::vector<S> dxn(size_t(TC), S(0));
  channel_mix_backward(channel_mix_tensors(get, name), channel_mix_tensors(gget, name), s.cm, dx.data(), dxn.data(), T,
                       C, F);
  group_norm_backward(dxn.data(), s.x_mid.data(), w(name + "ln2.weight"), s.ln2_mean.data(), s.ln2_rstd.data(),
                      dx.data(), g(name + "ln2.weight"), g(name + "ln2.bias"), T, C, C);
  std::fill(dxn.begin(), dxn.end(), S(0));
  if (rwkv) {
    const bool first = br.index == 0;
    const TimeMixShape sh{T, C, cfg_.head_size, cfg_.dim_w, cfg_.dim_a, cfg_.dim_v, cfg_.dim_g, first};
    time_mix_backward(time_mix_tensors(get, name, first), time_mix_tensors(gget, name, first), sh, v_first.data(),
                      s.tm, dx.data(), dxn.data(), dv_first.data());
  } else {
    const MobaShape sh{T, C, cfg_.sparse.head_dim, cfg_.sparse.chunk, cfg_.sparse.top_k};
    sparse_attn_backward(sparse_attn_tensors(get, name), sparse_attn_tensors(gget, name), sh, s.xn1.data(), s.sa,
                         dx.data(), dxn.data());
  }
  group_norm_backward(dxn.data(), s.x_in.data(), w(name + "ln1.weight"), s.ln1_mean.data(), s.ln1_rstd.data(),
                      dx.data(), g(name + "ln1.weight"), g(name + "ln1.bias"), T, C, C);
  s = BlockSaved{};
}

int64_t pad_sequence(const int32_t* ids, const int32_t* targets, int64_t T, int64_t V, const LossOptions& opt,
                     std::vector<int32_t>& ids_p, std::vector<int32_t>& targets_p) {
  for (int64_t t = 0; t < T; ++t) {
    if (ids[t] < 0 || ids[t] >= V)
      throw Error("train: token id " + std::to_string(ids[t]) + " at position " + std::to_string(t) +
                  " is outside the vocabulary [0, " + std::to_string(V) + ")");
    if (targets && targets[t] >= V)
      throw Error("train: target " + std::to_string(targets[t]) + " at position " + std::to_string(t) +
                  " is outside the vocabulary [0, " + std::to_string(V) + ")");
  }
  if (opt.pad_multiple > 0 && (opt.pad_id < 0 || opt.pad_id >= V))
    throw Error("train: pad token " + std::to_string(opt.pad_id) + " is outside the vocabulary [0, " +
                std::to_string(V) + ")");
  // Left padding (spec system.md §4.3): pad positions run through the model but are never scored.
  const int64_t P = opt.pad_multiple > 0 ? (opt.pad_multiple - T % opt.pad_multiple) % opt.pad_multiple : 0;
  ids_p.assign(size_t(T + P), opt.pad_id);
  targets_p.assign(size_t(T + P), -1);
  std::copy(ids, ids + T, ids_p.begin() + P);
  if (targets) std::copy(targets, targets + T, targets_p.begin() + P);
  return P;
}

template <class S>
void TrainModelT<S>::forward_pass(const int32_t* ids, const int32_t* targets, int64_t T, const LossOptions& opt,
                                  bool keep, bool keep_logits, Pass& p) const {
  RWKVX_ASSERT(T > 0 && opt.batch_size > 0, "train: empty sequence or batch");
  const int64_t C = cfg_.n_embd, V = cfg_.n_vocab;
  p.P = pad_sequence(ids, targets, T, V, opt, p.ids, p.targets);
  p.Tp = T + p.P;
  const int64_t Tp = p.Tp, TC = Tp * C;
  const size_t n_blocks = cfg_.exec_order.size();
  p.blocks.assign(n_blocks, BlockSaved{});
  p.e.assign(size_t(TC), S(0)), p.ln0_mean.assign(size_t(Tp), S(0)), p.ln0_rstd.assign(size_t(Tp), S(0));
  embedding_forward(w(cfg_.prefix + "emb.weight"), p.ids.data(), p.e.data(), Tp, V, C);
  std::vector<S> x(static_cast<size_t>(TC));
  group_norm_forward(p.e.data(), w(cfg_.prefix + "blocks.0.ln0.weight"), w(cfg_.prefix + "blocks.0.ln0.bias"),
                     x.data(), p.ln0_mean.data(), p.ln0_rstd.data(), Tp, C, C, kLnEps);
  p.v_first.assign(size_t(TC), S(0));
  for (size_t b = 0; b < n_blocks; ++b) {
    block_forward(b, x, p.v_first, p.blocks[b], Tp);
    if (!keep) p.blocks[b] = BlockSaved{};
    else if (recompute) p.blocks[b].release();
  }
  p.loss.assign(size_t(Tp), 0.0), p.lse.assign(size_t(Tp), 0.0), p.row_max.assign(size_t(Tp), 0.0);
  if (keep_logits) p.logits.assign(size_t(Tp * V), S(0));
  head_loss_forward(head_tensors([&](const std::string& n) -> const S* { return w(n); }, cfg_.prefix), x.data(),
                    p.targets.data(), p.head, p.loss.data(), p.lse.data(), p.row_max.data(),
                    keep_logits ? p.logits.data() : nullptr, Tp, C, V);
  p.x_final = std::move(x);
}

LossReport score_positions(const std::vector<int32_t>& targets, const std::vector<double>& loss,
                           const std::vector<double>& row_max, int64_t P, const double* wts, int64_t T,
                           const LossOptions& opt, std::vector<double>& coef, double* objective) {
  const int64_t Tp = int64_t(targets.size());
  int64_t n_valid = 0;
  for (int64_t t = 0; t < T; ++t) n_valid += targets[size_t(P + t)] >= 0;
  const double B = double(opt.batch_size);
  const double denom =
      opt.reduction == LossReduction::mean_all ? B * double(T) : B * double(std::max<int64_t>(1, n_valid));
  coef.assign(size_t(Tp), 0.0);
  LossReport rep;
  rep.n_scored = n_valid;
  for (int64_t t = 0; t < T; ++t) {
    if (targets[size_t(P + t)] < 0) continue;
    coef[size_t(P + t)] = wts[t] / denom;
    rep.loss += coef[size_t(P + t)] * loss[size_t(P + t)];
    rep.mean_ce += loss[size_t(P + t)];
  }
  rep.mean_ce /= double(std::max<int64_t>(1, n_valid));
  if (objective) {
    double pen = 0;
    for (int64_t t = P; t < Tp; ++t) pen += 0.5 * row_max[size_t(t)] * row_max[size_t(t)];
    *objective = rep.loss + (opt.l2wrap ? pen * kL2WrapCoef / (B * double(T)) : 0.0);
  }
  return rep;
}

template <class S>
LossReport TrainModelT<S>::score(const Pass& p, const int32_t* ids, const int32_t* targets, const double* weights,
                                 int64_t T, const LossOptions& opt, std::vector<double>& coef,
                                 double* objective) const {
  const int64_t P = p.P;
  std::vector<double> wts(size_t(T), 1.0);
  if (weights) {
    std::copy(weights, weights + T, wts.begin());
  } else if (opt.kind == LossKind::longce) {
    // ℓ_full from this very forward; ℓ_short from fresh forwards over the windows (no gradient).
    longce_fill(ids, targets, T, opt, p.loss.data() + P, wts.data());
  }
  return score_positions(p.targets, p.loss, p.row_max, P, wts.data(), T, opt, coef, objective);
}

template <class S>
void TrainModelT<S>::backward_pass(Pass& p, const std::vector<double>& coef, const LossOptions& opt, int64_t T) {
  const int64_t C = cfg_.n_embd, V = cfg_.n_vocab, P = p.P, Tp = p.Tp, TC = Tp * C;
  // L2Wrap: added as is, never scaled by anything upstream (spec §4.4, replicating the official code).
  const double l2_scale = opt.l2wrap ? kL2WrapCoef / (double(opt.batch_size) * double(T)) : 0.0;
  std::vector<S> dx(size_t(TC), S(0));
  head_loss_backward(head_tensors([&](const std::string& n) -> const S* { return w(n); }, cfg_.prefix),
                     head_tensors([&](const std::string& n) -> S* { return g(n); }, cfg_.prefix), p.x_final.data(),
                     p.head, p.targets.data(), p.lse.data(), coef.data(), l2_scale, P, dx.data(), Tp, C, V);
  std::vector<S> dv_first(size_t(TC), S(0));
  for (size_t b = p.blocks.size(); b-- > 0;) block_backward(b, p.blocks[b], p.v_first, dx, dv_first, Tp);
  std::vector<S> de(size_t(TC), S(0));
  group_norm_backward(dx.data(), p.e.data(), w(cfg_.prefix + "blocks.0.ln0.weight"), p.ln0_mean.data(),
                      p.ln0_rstd.data(), de.data(), g(cfg_.prefix + "blocks.0.ln0.weight"),
                      g(cfg_.prefix + "blocks.0.ln0.bias"), Tp, C, C);
  if (S* demb = g(cfg_.prefix + "emb.weight")) embedding_backward(de.data(), p.ids.data(), demb, Tp, C);
}

template <class S>
LossReport TrainModelT<S>::step(const int32_t* ids, const int32_t* targets, const double* weights, int64_t T,
                                const LossOptions& opt) {
  RWKVX_ASSERT(targets != nullptr, "train: targets required");
  Pass p;
  forward_pass(ids, targets, T, opt, true, false, p);
  std::vector<double> coef;
  const LossReport rep = score(p, ids, targets, weights, T, opt, coef, nullptr);
  backward_pass(p, coef, opt, T);
  return rep;
}

template <class S>
std::vector<S> TrainModelT<S>::logits(const int32_t* ids, int64_t T) const {
  Pass p;
  forward_pass(ids, nullptr, T, LossOptions{}, false, true, p);
  return std::move(p.logits);
}

template <class S>
std::vector<double> TrainModelT<S>::position_losses(const int32_t* ids, const int32_t* targets, int64_t T,
                                                    const LossOptions& opt) const {
  Pass p;
  forward_pass(ids, targets, T, opt, false, false, p);
  return std::vector<double>(p.loss.begin() + p.P, p.loss.end());
}

template <class S>
void TrainModelT<S>::longce_fill(const int32_t* ids, const int32_t* targets, int64_t T, const LossOptions& opt,
                                 const double* loss_full, double* wts) const {
  for (const LongCeWindow& win : longce_windows(T, opt.longce)) {
    const std::vector<double> shrt = position_losses(ids + win.begin, targets + win.begin, win.end - win.begin, opt);
    for (int64_t i = 0; i < win.n; ++i) {
      const int64_t t = win.begin + opt.longce.truncated + i;
      wts[t] = longce_weight(shrt[size_t(opt.longce.truncated + i)], loss_full[t], opt.longce.cap);
    }
  }
}

template <class S>
std::vector<double> TrainModelT<S>::longce_weights(const int32_t* ids, const int32_t* targets, int64_t T,
                                                   const LossOptions& opt) const {
  const std::vector<double> full = position_losses(ids, targets, T, opt);
  std::vector<double> wts(size_t(T), 1.0);
  longce_fill(ids, targets, T, opt, full.data(), wts.data());
  return wts;
}

template <class S>
LossReport TrainModelT<S>::forward_backward(const int32_t* ids, const int32_t* targets, int64_t T,
                                            const LossOptions& opt) {
  return step(ids, targets, nullptr, T, opt);
}

template <class S>
LossReport TrainModelT<S>::forward_backward_weighted(const int32_t* ids, const int32_t* targets, const double* weights,
                                                     int64_t T, const LossOptions& opt) {
  return step(ids, targets, weights, T, opt);
}

template <class S>
double TrainModelT<S>::objective(const int32_t* ids, const int32_t* targets, const double* weights, int64_t T,
                                 const LossOptions& opt) const {
  Pass p;
  forward_pass(ids, targets, T, opt, false, false, p);
  std::vector<double> coef;
  double obj = 0;
  score(p, ids, targets, weights, T, opt, coef, &obj);
  return obj;
}

template class TrainModelT<float>;
template class TrainModelT<double>;

}  // namespace rwkvx::train
