// Model loading (checkpoint -> backend weights) and the layer schedule of the forward pass
// (spec model.md §2): embedding + ln0, blocks in execution order, ln_out + head.
#include "model/model.h"

#include <algorithm>
#include <string>

namespace rwkvx {
namespace {

class WeightLoader {
 public:
  WeightLoader(const TensorStore& s, Backend& be, int64_t C) : s_(s), be_(be), C_(C) {}
  Tensor mat(const std::string& name) {
    const StoredTensor& t = s_.get(name);
    return be_.upload_weight(t, {t.shape[0], t.shape[1]});
  }
  Tensor vec(const std::string& name) { return be_.upload_weight(s_.get(name), {C_}); }
  LayerNormWeights ln(const std::string& name) { return {vec(name + ".weight"), vec(name + ".bias")}; }
  ChannelMixWeights ffn(const std::string& b) {
    return {vec(b + "ffn.x_k"), mat(b + "ffn.key.weight"), mat(b + "ffn.value.weight")};
  }

 private:
  const TensorStore& s_;
  Backend& be_;
  int64_t C_;
};

}  // namespace

std::unique_ptr<Model> Model::load(const std::string& path, const ModelOptions& options, Backend& backend) {
  TensorStore store = load_checkpoint(path);
  return from_store(store, options, backend);
}

std::unique_ptr<Model> Model::from_store(const TensorStore& store, const ModelOptions& options, Backend& backend) {
  std::unique_ptr<Model> m(new Model(infer_config(store, options), backend));
  if (m->cfg_.max_rows_per_call == 0) m->cfg_.max_rows_per_call = backend.preferred_rows_per_call();
  const ModelConfig& c = m->cfg_;
  WeightLoader L(store, backend, c.n_embd);
  ModelWeights& w = m->w_;
  const std::string p = c.prefix;
  w.emb = L.mat(p + "emb.weight");
  w.ln0 = L.ln(p + "blocks.0.ln0");
  w.ln_out = L.ln(p + "ln_out");
  w.head = L.mat(p + "head.weight");
  for (int64_t i = 0; i < c.n_rwkv; ++i) {
    const std::string b = p + "blocks." + std::to_string(i) + ".";
    RwkvBlockWeights bw;
    bw.ln1 = L.ln(b + "ln1");
    bw.ln2 = L.ln(b + "ln2");
    TimeMixWeights& a = bw.att;
    const std::string t = b + "att.";
    a.x_r = L.vec(t + "x_r"), a.x_w = L.vec(t + "x_w"), a.x_k = L.vec(t + "x_k");
    a.x_v = L.vec(t + "x_v"), a.x_a = L.vec(t + "x_a"), a.x_g = L.vec(t + "x_g");
    a.w0 = L.vec(t + "w0"), a.w1 = L.mat(t + "w1"), a.w2 = L.mat(t + "w2");
    a.a0 = L.vec(t + "a0"), a.a1 = L.mat(t + "a1"), a.a2 = L.mat(t + "a2");
    if (i > 0) a.v0 = L.vec(t + "v0"), a.v1 = L.mat(t + "v1"), a.v2 = L.mat(t + "v2");
    a.g1 = L.mat(t + "g1"), a.g2 = L.mat(t + "g2");
    a.k_k = L.vec(t + "k_k"), a.k_a = L.vec(t + "k_a"), a.r_k = L.mat(t + "r_k");
    a.receptance = L.mat(t + "receptance.weight"), a.key = L.mat(t + "key.weight");
    a.value = L.mat(t + "value.weight"), a.output = L.mat(t + "output.weight");
    a.ln_x = L.ln(t + "ln_x");
    bw.ffn = L.ffn(b);
    w.rwkv.push_back(std::move(bw));
  }
  for (int64_t j = 0; j < c.n_sparse; ++j) {
    const std::string b = "moba." + std::to_string(j) + ".";
    SparseBlockWeights sw;
    sw.ln1 = L.ln(b + "ln1");
    sw.ln2 = L.ln(b + "ln2");
    sw.query = L.mat(b + "att.receptance.weight"), sw.key = L.mat(b + "att.key.weight");
    sw.value = L.mat(b + "att.value.weight"), sw.output = L.mat(b + "att.output.weight");
    sw.ffn = L.ffn(b);
    w.sparse.push_back(std::move(sw));
  }
  return m;
}

bool Model::step_decoder_active() const {
  if (!use_step_decoder_ || cfg_.eviction.max_len > 0) return false;
  if (!step_decoder_tried_) {
    step_decoder_tried_ = true;
    step_decoder_ = be_->make_step_decoder(cfg_, w_);
  }
  return step_decoder_ != nullptr;
}

State Model::new_state(int n_slots) const {
  const ModelConfig& c = cfg_;
  State s;
  s.n_slots = n_slots;
  for (int64_t i = 0; i < c.n_rwkv; ++i) {
    s.att_shift.push_back(be_->alloc(DType::f32, {n_slots, c.n_embd}));
    s.wkv.push_back(be_->alloc(DType::f32, {n_slots, c.n_head, c.head_size, c.head_size}));
  }
  for (int64_t i = 0; i < c.n_rwkv + c.n_sparse; ++i) s.ffn_shift.push_back(be_->alloc(DType::f32, {n_slots, c.n_embd}));
  KvCache empty;
  empty.dtype = c.kv_dtype;
  s.kv.assign(size_t(c.n_sparse), std::vector<KvCache>(size_t(n_slots), empty));
  s.pos.assign(size_t(n_slots), 0);
  return s;
}

void Model::reset_slot(State& s, int slot) const {
  auto zero_row = [&](Tensor& t) {
    Tensor r = t.rows_view(slot, 1);
    be_->fill_zero(r);
  };
  for (Tensor& t : s.att_shift) zero_row(t);
  for (Tensor& t : s.wkv) zero_row(t);
  for (Tensor& t : s.ffn_shift) zero_row(t);
  for (auto& caches : s.kv) {
    caches[size_t(slot)] = KvCache{};
    caches[size_t(slot)].dtype = cfg_.kv_dtype;
  }
  s.pos[size_t(slot)] = 0;
}

Tensor Model::forward(const int32_t* ids, const SeqBatch& batch, State& state, LogitsMode mode) const {
  const ModelConfig& c = cfg_;
  Backend& be = *be_;
  const int64_t T = batch.n_rows();
  for (int64_t t = 0; t < T; ++t)
    if (ids[t] < 0 || ids[t] >= c.n_vocab)
      throw Error("token id " + std::to_string(ids[t]) + " at position " + std::to_string(t) +
                  " is outside the model's vocabulary [0, " + std::to_string(c.n_vocab) + ")");
  RWKVX_ASSERT(batch.row_start.size() == batch.slot.size() + 1 && batch.row_start[0] == 0, "forward: bad SeqBatch");
  std::vector<bool> used(size_t(state.n_slots), false);
  for (int64_t s = 0; s < batch.n_seq(); ++s) {
    const int32_t slot = batch.slot[size_t(s)];
    RWKVX_ASSERT(slot >= 0 && slot < state.n_slots && !used[size_t(slot)], "forward: slot out of range or repeated");
    RWKVX_ASSERT(batch.row_start[size_t(s) + 1] >= batch.row_start[size_t(s)], "forward: rows out of order");
    used[size_t(slot)] = true;
  }
  if (T == 0) return Tensor{};
  if (T == batch.n_seq() && step_decoder_active()) {  // one row per sequence: a decode step
    Tensor logits;
    if (step_decoder_->step(ids, batch, state, logits)) {
      for (int64_t s = 0; s < batch.n_seq(); ++s) state.pos[size_t(batch.slot[size_t(s)])] += 1;
      return mode == LogitsMode::none ? Tensor{} : logits;
    }
  }
  if (T <= c.max_rows_per_call) return forward_rows(ids, batch, state, mode);

  // Long input: consecutive windows of rows, each a SeqBatch of the sequence parts it covers. Logits of a
  // window land in the rows (::all) or sequences (::last, where the sequence ends inside it) they belong to.
  Tensor logits;
  if (mode == LogitsMode::all) logits = be.alloc(DType::f32, {T, c.n_vocab});
  if (mode == LogitsMode::last) logits = be.alloc(DType::f32, {batch.n_seq(), c.n_vocab});
  for (int64_t w0 = 0; w0 < T; w0 += c.max_rows_per_call) {
    const int64_t w1 = std::min(T, w0 + c.max_rows_per_call);
    SeqBatch part{{0}, {}};
    std::vector<int64_t> ending;  // original sequence index of each part sequence that ends in this window
    for (int64_t s = 0; s < batch.n_seq(); ++s) {
      const int64_t r0 = std::max(w0, batch.row_start[size_t(s)]), r1 = std::min(w1, batch.row_start[size_t(s) + 1]);
      if (r1 <= r0) continue;
      part.slot.push_back(batch.slot[size_t(s)]);
      part.row_start.push_back(part.row_start.back() + (r1 - r0));
      ending.push_back(r1 == batch.row_start[size_t(s) + 1] ? s : -1);
    }
    const bool any_end = std::any_of(ending.begin(), ending.end(), [](int64_t s) { return s >= 0; });
    const LogitsMode m = mode == LogitsMode::last && !any_end ? LogitsMode::none : mode;
    Tensor lw = forward_rows(ids + w0, part, state, m);
    if (m == LogitsMode::all) {
      Tensor dst = logits.rows_view(w0, w1 - w0);
      be.copy(lw, dst);
    } else if (m == LogitsMode::last) {
      for (size_t i = 0; i < ending.size(); ++i) {
        if (ending[i] < 0) continue;
        Tensor dst = logits.rows_view(ending[i], 1);
        be.copy(lw.rows_view(int64_t(i), 1), dst);
      }
    }
  }
  return logits;
}

Tensor Model::forward_rows(const int32_t* ids, const SeqBatch& batch, State& state, LogitsMode mode) const {
  const ModelConfig& c = cfg_;
  Backend& be = *be_;
  const int64_t T = batch.n_rows(), C = c.n_embd;
  // x, xn: whole outputs of embedding / layer_norm (the blocks then add into x).
  Tensor x = be.alloc_uninit(DType::f32, {T, C}), xn = be.alloc_uninit(DType::f32, {T, C});
  embed_rows(ids, T, x);
  Tensor v_first = be.alloc(DType::f32, {T, C});
  for (size_t i = 0; i < c.exec_order.size(); ++i) run_block(i, x, xn, v_first, batch, state);
  for (int64_t s = 0; s < batch.n_seq(); ++s)
    state.pos[size_t(batch.slot[size_t(s)])] += batch.row_start[size_t(s) + 1] - batch.row_start[size_t(s)];

  if (mode == LogitsMode::none) return Tensor{};
  Tensor logits;
  if (mode == LogitsMode::all) {
    be.layer_norm(x, w_.ln_out.weight, w_.ln_out.bias, 1e-5f, xn);
    logits = be.alloc_uninit(DType::f32, {T, c.n_vocab});
    be.linear(xn, w_.head, logits);
  } else {
    logits = be.alloc(DType::f32, {batch.n_seq(), c.n_vocab});
    for (int64_t s = 0; s < batch.n_seq(); ++s) {
      const int64_t r1 = batch.row_start[size_t(s) + 1];
      if (r1 == batch.row_start[size_t(s)]) continue;
      Tensor xs = x.rows_view(r1 - 1, 1), ns = xn.rows_view(0, 1), ls = logits.rows_view(s, 1);
      head_row(xs, ns, ls);
    }
  }
  return logits;
}

void Model::embed_rows(const int32_t* ids, int64_t n, Tensor& x) const {
  be_->embedding(w_.emb, ids, n, x);
  be_->layer_norm(x, w_.ln0.weight, w_.ln0.bias, 1e-5f, x);
}

void Model::run_block(size_t i, Tensor& x, Tensor& xn, Tensor& v_first, const SeqBatch& batch,
                      State& state) const {
  const ModelConfig& c = cfg_;
  Backend& be = *be_;
  const BlockRef& b = c.exec_order[i];
  const bool rwkv = b.kind == BlockRef::Kind::rwkv;
  const LayerNormWeights& ln1 = rwkv ? w_.rwkv[size_t(b.index)].ln1 : w_.sparse[size_t(b.index)].ln1;
  const LayerNormWeights& ln2 = rwkv ? w_.rwkv[size_t(b.index)].ln2 : w_.sparse[size_t(b.index)].ln2;
  be.layer_norm(x, ln1.weight, ln1.bias, 1e-5f, xn);
  if (rwkv) {
    rwkv7_time_mix(be, w_.rwkv[size_t(b.index)].att, c, xn, state.att_shift[size_t(b.index)],
                   state.wkv[size_t(b.index)], batch, v_first, b.index == 0, x);
  } else {
    sparse_attention_block(be, w_.sparse[size_t(b.index)], c, xn, state.kv[size_t(b.index)], batch, x);
  }
  be.layer_norm(x, ln2.weight, ln2.bias, 1e-5f, xn);
  const size_t ffn_slot = rwkv ? size_t(b.index) : size_t(c.n_rwkv + b.index);
  const ChannelMixWeights& ffn = rwkv ? w_.rwkv[size_t(b.index)].ffn : w_.sparse[size_t(b.index)].ffn;
  rwkv7_channel_mix(be, ffn, xn, state.ffn_shift[ffn_slot], batch, x);
}

void Model::head_row(const Tensor& x_row, Tensor& xn_row, Tensor& logits) const {
  be_->layer_norm(x_row, w_.ln_out.weight, w_.ln_out.bias, 1e-5f, xn_row);
  be_->linear(xn_row, w_.head, logits);
}

}  // namespace rwkvx
