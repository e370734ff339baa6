// Session: lazy prefill, the generation loop around Generation, state files and snapshots.
#include "runtime/session.h"

#include <algorithm>

#include "model/state_copy.h"
#include "runtime/tokenizer.h"

namespace rwkvx {

struct Session::Snapshot {
  State state;
  std::vector<int32_t> tokens;
  int64_t n_pending;
  std::vector<float> logits;
};

Session::Session(const Model& model, std::string fingerprint, const Tokenizer* tok)
    : model_(model), fingerprint_(std::move(fingerprint)), tok_(tok), state_(model.new_state(1)) {
  if (tok_) weights_ = std::make_shared<const std::vector<uint8_t>>(rwkvx::penalty_weights(*tok_, model.config().n_vocab));
}

void Session::reset() {
  model_.reset_slot(state_, 0);
  tokens_.clear();
  n_pending_ = 0;
  logits_.clear();
}

void Session::append(std::span<const int32_t> ids) {
  const int64_t V = model_.config().n_vocab;
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= V)
      throw Error("input token " + std::to_string(i) + " has id " + std::to_string(ids[i]) +
                  ", outside the model's vocabulary [0, " + std::to_string(V) +
                  ") (does the vocabulary file match the model?)");
  tokens_.insert(tokens_.end(), ids.begin(), ids.end());
  n_pending_ += int64_t(ids.size());
}

void Session::prefill(const Progress& progress, int64_t chunk) {
  RWKVX_ASSERT(chunk > 0, "prefill chunk must be positive");
  const int64_t total = n_pending_;
  const int32_t* ids = tokens_.data() + (tokens_.size() - size_t(n_pending_));
  for (int64_t done = 0; done < total;) {
    const int64_t n = std::min(chunk, total - done);
    const bool last = done + n == total;
    Tensor l = model_.forward(ids + done, SeqBatch::single(n), state_, last ? LogitsMode::last : LogitsMode::none);
    if (last) {
      logits_.resize(size_t(l.numel()));
      model_.backend().to_host(l, logits_.data());
    }
    done += n;
    n_pending_ -= n;
    if (progress) progress(done, total);
  }
}

GenerationResult Session::generate(const SamplingParams& params, int64_t max_tokens,
                                   const std::function<void(const std::string&)>& on_text,
                                   const std::atomic<bool>* cancel) {
  Generation gen(params, max_tokens, model_.config().n_vocab, tok_, weights_);
  while (!gen.finished()) {
    if (cancel && cancel->load()) {
      if (std::string rest = gen.finish(FinishReason::cancelled); !rest.empty() && on_text) on_text(rest);
      break;
    }
    prefill();
    if (logits_.empty()) throw Error("cannot generate: the prompt is empty (RWKV has no start token)");
    GenerationStep st = gen.step(logits_);
    if (st.accepted) append(std::span<const int32_t>(&st.token, 1));
    if (!st.text.empty() && on_text) on_text(st.text);
  }
  return {gen.text(), gen.tokens(), gen.reason()};
}

void Session::save(const std::string& path) const {
  save_state_file(path, model_, fingerprint_, state_, 0, {tokens_, n_pending_, n_pending_ == 0 ? logits_ : std::vector<float>{}});
}

void Session::load(const std::string& path) {
  SessionTokens t = load_state_file(path, model_, fingerprint_, state_, 0);
  tokens_ = std::move(t.tokens);
  n_pending_ = t.n_pending;
  logits_ = std::move(t.logits);
}

std::shared_ptr<const Session::Snapshot> Session::snapshot() const {
  auto s = std::make_shared<Snapshot>();
  s->state = model_.new_state(1);
  copy_state_slot(model_.backend(), state_, 0, s->state, 0);
  s->tokens = tokens_;
  s->n_pending = n_pending_;
  s->logits = logits_;
  return s;
}

void Session::restore(const Snapshot& snap) {
  copy_state_slot(model_.backend(), snap.state, 0, state_, 0);
  tokens_ = snap.tokens;
  n_pending_ = snap.n_pending;
  logits_ = snap.logits;
}

}  // namespace rwkvx
