// The continuous-batching loop (see scheduler.h). A request moves through three phases in its slot:
// prefill (prompt tokens not yet in the state), decode (one row per step: the last accepted token),
// and tail (after the response is complete: feeding the last accepted token, and for chat the
// separator, so the cached state covers the whole conversation). Only then is its slot freed.
#include "server/scheduler.h"

#include <algorithm>

namespace rwkvx {

bool Job::next(JobEvent& out) {
  std::unique_lock<std::mutex> lock(mu_);
  if (delivered_final_) return false;
  cv_.wait(lock, [&] { return !events_.empty(); });
  out = JobEvent{};
  while (!events_.empty()) {
    JobEvent& e = events_.front();
    out.text += e.text;
    out.tokens.insert(out.tokens.end(), e.tokens.begin(), e.tokens.end());
    if (e.final) {
      out.final = true;
      out.reason = e.reason;
      out.usage = e.usage;
      out.error = e.error;
    }
    events_.pop_front();
  }
  delivered_final_ = out.final;
  return true;
}

void Job::push(JobEvent e) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(e));
  }
  cv_.notify_all();
}

struct Scheduler::Active {
  std::shared_ptr<Job> job;
  int slot = 0;
  std::vector<int32_t> seq;  // prompt + accepted tokens (+ a fed stop token): what the slot will hold
  int64_t fed = 0;           // seq[0, fed) are in the state
  int64_t n_prompt = 0, n_cached = 0;
  std::unique_ptr<Generation> gen;
  std::vector<float> ready_logits;  // from the prefix cache: sample without a forward
  bool tail = false;                // response sent; feeding the rest of seq before caching
  bool done = false;                // slot can be freed
};

Scheduler::Scheduler(const Model& model, const Tokenizer* tok, std::shared_ptr<const std::vector<uint8_t>> weights,
                     SchedulerOptions opt)
    : model_(model),
      tok_(tok),
      weights_(std::move(weights)),
      opt_(opt),
      state_(model.new_state(opt.n_slots)),
      cache_(model, opt.prefix_cache_bytes) {
  RWKVX_ASSERT(opt_.n_slots >= 1 && opt_.prefill_chunk >= 1, "scheduler needs a slot and a prefill budget");
  for (int s = opt_.n_slots - 1; s >= 0; --s) free_slots_.push_back(s);
  thread_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() { stop(); }

std::shared_ptr<Job> Scheduler::submit(ServeRequest r) {
  RWKVX_ASSERT(!r.prompt.empty() && r.max_tokens >= 1, "submit: empty prompt or no tokens to generate");
  auto job = std::make_shared<Job>(std::move(r));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || draining_) throw SchedulerBusy("the server is shutting down");
    if (queue_.size() >= opt_.max_queue)
      throw SchedulerBusy("the server is busy: " + std::to_string(queue_.size()) + " requests are waiting");
    queue_.push_back(job);
  }
  cv_.notify_all();
  return job;
}

void Scheduler::drain(std::chrono::milliseconds grace) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    draining_ = true;
    drain_deadline_ = std::chrono::steady_clock::now() + grace;
  }
  cv_.notify_all();
}

void Scheduler::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

Scheduler::Stats Scheduler::stats() const {
  Stats s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s.queued = queue_.size();
  }
  s.active = n_active_;
  s.completed = completed_;
  s.steps = steps_;
  s.max_batch_seqs = max_batch_seqs_;
  s.cache = cache_.stats();
  return s;
}

void Scheduler::loop() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty() || !active_.empty(); });
      if (stopping_ || (draining_ && std::chrono::steady_clock::now() >= drain_deadline_)) {
        // Everything still waiting or running ends now, with a final event so no reader blocks.
        for (auto& job : queue_) {
          JobEvent e;
          e.final = true;
          e.reason = FinishReason::cancelled;
          job->push(std::move(e));
        }
        queue_.clear();
        lock.unlock();
        for (auto& a : active_) {
          if (!a->gen->finished()) finish(*a, FinishReason::cancelled);
          free_slots_.push_back(a->slot);
        }
        active_.clear();
        n_active_ = 0;
        if (stopping_) return;
        continue;
      }
      admit(lock);
    }
    try {
      step();
    } catch (const std::exception& e) {
      // An engine failure ends the requests of this step, not the server: their slots are reset.
      for (auto& a : active_) {
        if (!a->gen->finished()) finish(*a, FinishReason::cancelled, e.what());
        model_.reset_slot(state_, a->slot);
        free_slots_.push_back(a->slot);
      }
      active_.clear();
      n_active_ = 0;
    }
  }
}

void Scheduler::admit(std::unique_lock<std::mutex>& lock) {
  while (!queue_.empty() && !free_slots_.empty()) {
    std::shared_ptr<Job> job = queue_.front();
    queue_.pop_front();
    auto a = std::make_unique<Active>();
    a->job = job;
    a->slot = free_slots_.back();
    free_slots_.pop_back();
    const ServeRequest& r = job->request;
    a->seq = r.prompt;
    a->n_prompt = int64_t(r.prompt.size());
    lock.unlock();  // cache copies can be large; HTTP threads keep submitting meanwhile
    try {
      a->gen = std::make_unique<Generation>(r.sampling, r.max_tokens, model_.config().n_vocab, tok_, weights_);
      PrefixCache::Hit hit = cache_.restore_longest_prefix(r.prompt, state_, a->slot);
      if (hit.n_tokens == 0) model_.reset_slot(state_, a->slot);
      a->fed = a->n_cached = hit.n_tokens;
      a->ready_logits = std::move(hit.logits);
    } catch (const std::exception& e) {
      // Out of memory restoring a cached state, say: this request fails, the others go on.
      JobEvent ev;
      ev.final = true;
      ev.reason = FinishReason::cancelled;
      ev.error = e.what();
      job->push(std::move(ev));
      lock.lock();
      free_slots_.push_back(a->slot);
      continue;
    }
    lock.lock();
    active_.push_back(std::move(a));
  }
  n_active_ = active_.size();
}

void Scheduler::finish(Active& a, FinishReason reason, const std::string& error) {
  JobEvent e;
  e.text = a.gen->finish(reason);
  e.final = true;
  e.reason = a.gen->reason();
  e.error = error;
  e.usage = {a.n_prompt, a.n_cached, int64_t(a.gen->tokens().size())};
  a.job->push(std::move(e));
  a.done = true;
  ++completed_;
}

void Scheduler::sample(Active& a, std::span<const float> logits) {
  GenerationStep st = a.gen->step(logits);
  if (st.accepted) a.seq.push_back(st.token);
  if (!a.gen->finished()) {
    JobEvent e;
    e.text = std::move(st.text);
    e.tokens.push_back(st.token);
    a.job->push(std::move(e));
    return;
  }
  JobEvent e;
  e.text = std::move(st.text);
  if (st.accepted) e.tokens.push_back(st.token);
  e.final = true;
  e.reason = a.gen->reason();
  e.usage = {a.n_prompt, a.n_cached, int64_t(a.gen->tokens().size())};
  a.job->push(std::move(e));
  ++completed_;
  if (a.gen->reason() == FinishReason::stop_token && st.token == a.job->request.feed_stop_token)
    a.seq.push_back(st.token);
  if (int64_t(a.seq.size()) > a.fed) {
    a.tail = true;
  } else {
    cache_.insert(a.seq, state_, a.slot);
    a.done = true;
  }
}

bool Scheduler::step() {
  const auto now = std::chrono::steady_clock::now();
  for (auto& a : active_) {
    if (a->done || a->tail) continue;
    if (a->job->cancelled()) {
      finish(*a, FinishReason::cancelled);
    } else if (now >= a->job->request.deadline) {
      finish(*a, FinishReason::timeout);
    } else if (!a->ready_logits.empty()) {
      std::vector<float> l = std::move(a->ready_logits);
      a->ready_logits.clear();
      sample(*a, l);
    }
  }

  // One call: prefill chunks (FIFO within the budget), decode rows and tails.
  std::vector<int32_t> ids;
  SeqBatch batch;
  batch.row_start.push_back(0);
  std::vector<Active*> rows_of;
  int64_t budget = opt_.prefill_chunk;
  for (auto& a : active_) {
    if (a->done) continue;
    int64_t n = int64_t(a->seq.size()) - a->fed;
    if (a->fed < a->n_prompt) {
      n = std::min(n, budget);
      budget -= n;
    }
    if (n <= 0) continue;
    ids.insert(ids.end(), a->seq.begin() + a->fed, a->seq.begin() + a->fed + n);
    batch.row_start.push_back(int64_t(ids.size()));
    batch.slot.push_back(a->slot);
    rows_of.push_back(a.get());
  }

  if (!rows_of.empty()) {
    Tensor logits = model_.forward(ids.data(), batch, state_, LogitsMode::last);
    ++steps_;
    max_batch_seqs_ = std::max<uint64_t>(max_batch_seqs_, rows_of.size());
    const int64_t V = model_.config().n_vocab;
    std::vector<float> host(size_t(logits.numel()));
    model_.backend().to_host(logits, host.data());
    for (size_t s = 0; s < rows_of.size(); ++s) {
      Active& a = *rows_of[s];
      a.fed += batch.row_start[s + 1] - batch.row_start[s];
      std::span<const float> row(host.data() + s * size_t(V), size_t(V));
      if (a.tail) {
        if (!a.job->cancelled()) cache_.insert(a.seq, state_, a.slot, std::vector<float>(row.begin(), row.end()));
        a.done = true;
      } else if (a.fed == a.n_prompt && a.gen->tokens().empty()) {
        // The prompt just finished: remember its state for requests that share it.
        cache_.insert(a.seq, state_, a.slot, std::vector<float>(row.begin(), row.end()));
        sample(a, row);
      } else if (a.fed >= a.n_prompt) {
        sample(a, row);
      }
    }
  }

  for (auto& a : active_)
    if (a->done) free_slots_.push_back(a->slot);
  std::erase_if(active_, [](const std::unique_ptr<Active>& a) { return a->done; });
  n_active_ = active_.size();
  return !rows_of.empty();
}

}  // namespace rwkvx
