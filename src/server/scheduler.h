// Continuous batching for the server. ONE scheduler thread owns the model's State (one slot per
// concurrent request) and runs every forward call; HTTP threads only submit Jobs and read their
// events. Each step builds one SeqBatch that mixes prefill chunks of new requests with single decode
// rows of running ones (Model::forward, LogitsMode::last: one logits row per sequence), samples each
// request with its own Generation (own RNG and penalties), and streams the pieces back. Prompts start
// from the longest cached prefix state (PrefixCache); finished requests leave their states there.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "model/model.h"
#include "runtime/generation.h"
#include "server/prefix_cache.h"

namespace rwkvx {

class Tokenizer;

struct ServeRequest {
  std::vector<int32_t> prompt;  // at least one token
  SamplingParams sampling;
  int64_t max_tokens = 16;      // >= 1
  std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max();
  // Chat: when generation ends on this stop token, feed it before caching the state, so the cached
  // conversation ends with the turn separator the next request's prompt repeats. -1 = none.
  int32_t feed_stop_token = -1;
};

struct JobUsage {
  int64_t prompt_tokens = 0, cached_tokens = 0, completion_tokens = 0;
};

// What a Job reports, merged since the last read: new text and tokens, and at the end the reason and
// usage (or an error message if the engine failed).
struct JobEvent {
  std::string text;
  std::vector<int32_t> tokens;
  bool final = false;
  FinishReason reason = FinishReason::none;
  JobUsage usage;
  std::string error;
};

class Job {
 public:
  explicit Job(ServeRequest r) : request(std::move(r)) {}
  const ServeRequest request;

  // Consumer side (an HTTP thread). Blocks until something happened; returns false once the final
  // event has been delivered.
  bool next(JobEvent& out);
  // The client went away: the scheduler drops the request at its next step.
  void cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }

 private:
  friend class Scheduler;
  void push(JobEvent e);
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<JobEvent> events_;
  bool delivered_final_ = false;
  std::atomic<bool> cancelled_{false};
};

struct SchedulerOptions {
  int n_slots = 8;                 // sequences decoded together (--max-concurrency)
  int64_t prefill_chunk = 256;     // prompt tokens per step over all prefilling requests
  size_t max_queue = 64;           // waiting requests beyond the slots; more are refused (503)
  size_t prefix_cache_bytes = size_t(512) << 20;
};

// Thrown by submit() when the queue is full or the scheduler is shutting down.
struct SchedulerBusy : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Scheduler {
 public:
  Scheduler(const Model& model, const Tokenizer* tok, std::shared_ptr<const std::vector<uint8_t>> penalty_weights,
            SchedulerOptions opt);
  ~Scheduler();  // stop()

  std::shared_ptr<Job> submit(ServeRequest r);
  // Stops accepting work; requests still running after `grace` are cancelled. Returns at once.
  void drain(std::chrono::milliseconds grace);
  // Cancels everything and joins the thread.
  void stop();

  struct Stats {
    size_t active = 0, queued = 0;
    uint64_t completed = 0, steps = 0;
    uint64_t max_batch_seqs = 0;  // most sequences one forward call carried (continuous batching at work)
    PrefixCache::Stats cache;
  };
  Stats stats() const;

 private:
  struct Active;
  void loop();
  void admit(std::unique_lock<std::mutex>& lock);
  bool step();
  void sample(Active& a, std::span<const float> logits);
  void finish(Active& a, FinishReason reason, const std::string& error = {});

  const Model& model_;
  const Tokenizer* tok_;
  std::shared_ptr<const std::vector<uint8_t>> weights_;
  SchedulerOptions opt_;
  State state_;
  PrefixCache cache_;
  std::vector<std::unique_ptr<Active>> active_;
  std::vector<int> free_slots_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stopping_ = false, draining_ = false;
  std::chrono::steady_clock::time_point drain_deadline_;
  std::atomic<size_t> n_active_{0};
  std::atomic<uint64_t> completed_{0}, steps_{0}, max_batch_seqs_{0};
  std::thread thread_;
};

}  // namespace rwkvx
