// `rwkvx serve`: an OpenAI-compatible HTTP server (cpp-httplib) in front of the continuous-batching
// Scheduler. Routes: POST /v1/completions, POST /v1/chat/completions (stream via server-sent events or
// one JSON response, with usage), GET /v1/models, GET /health. HTTP threads parse and validate,
// submit a Job and relay its events; the model runs only on the scheduler thread. Every bad request
// gets a 4xx with an OpenAI error object and the server keeps serving.
#pragma once
#include <atomic>
#include <chrono>
#include <memory>
#include <string>

#include "model/model.h"
#include "server/openai_api.h"
#include "server/scheduler.h"

namespace rwkvx {

class Tokenizer;
class HttpListener;  // httplib::Server with a usable accept backlog (http_server.cpp)

struct ServerOptions {
  std::string model_name = "rwkvx";
  int max_concurrency = 8;            // state slots: requests decoded together
  size_t max_queue = 64;              // requests waiting for a slot; beyond it: 503
  int64_t max_tokens_limit = 4096;
  int64_t default_max_tokens = 256;
  int64_t max_context = 32768;
  std::chrono::milliseconds request_timeout{600000};
  size_t max_body_bytes = size_t(1) << 20;  // larger bodies: 413
  int64_t prefill_chunk = 256;
  size_t prefix_cache_bytes = size_t(512) << 20;
};

class OpenAiServer {
 public:
  OpenAiServer(const Model& model, const Tokenizer& tok, ServerOptions opt);
  ~OpenAiServer();

  // Binds the listening socket; port 0 picks a free one. Returns the port. Throws rwkvx::Error.
  int bind(const std::string& host, int port);
  // Serves until stop(); returns after every in-flight HTTP request has been answered.
  void run();
  // Graceful stop: new requests get 503, running ones may finish for `grace` (then they end with
  // finish_reason "cancelled"), every response is written to the end, then the listener closes and
  // run() returns. Blocks until then. Safe to call from any thread (e.g. a signal-waiting thread).
  void stop(std::chrono::milliseconds grace = std::chrono::milliseconds(0));

  Scheduler& scheduler() { return *sched_; }

 private:
  void routes();
  const Tokenizer& tok_;
  ServerOptions opt_;
  ApiLimits limits_;
  std::unique_ptr<Scheduler> sched_;
  std::unique_ptr<HttpListener> http_;
  int64_t created_ = 0;
  std::atomic<int> in_flight_{0};  // completion responses not yet fully written
};

}  // namespace rwkvx
