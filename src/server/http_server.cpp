// HTTP routes and OpenAI response shapes (see http_server.h).
#include "server/http_server.h"

#include <httplib.h>
#include <sys/socket.h>

#include <atomic>
#include <ctime>
#include <thread>

#include "runtime/sampler.h"
#include "runtime/tokenizer.h"

namespace rwkvx {

// cpp-httplib 0.11 listens with a backlog of 5, so a burst of new clients overflows the accept queue
// and some connections stall until a read timeout fails them (seen in the load test with 32 clients).
// listen() again on the bound socket raises the backlog.
class HttpListener : public httplib::Server {
 public:
  void raise_backlog() { ::listen(svr_sock_, SOMAXCONN); }
};

namespace {

using nlohmann::json;

void send_json(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(body.dump(), "application/json");
}

void send_error(httplib::Response& res, const ApiError& e) {
  send_json(res, e.status, error_body(e.what(), e.type, e.param, e.code));
}

std::string new_id(const char* prefix) {
  static std::atomic<uint64_t> counter{0};
  return std::string(prefix) + std::to_string(std::time(nullptr)) + "-" + std::to_string(++counter);
}

json usage_json(const JobUsage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}},
          {"prompt_tokens_cached", u.cached_tokens}};
}

// The chat reply drops the whitespace the model puts after "Assistant:"; the chat template adds it
// back ("Assistant: " + content) when the conversation comes back in the next request.
class ReplyText {
 public:
  explicit ReplyText(bool chat) : strip_(chat) {}
  std::string operator()(std::string s) {
    if (!strip_) return s;
    const size_t b = s.find_first_not_of(" \t\n");
    if (b == std::string::npos) return {};
    strip_ = false;
    return s.substr(b);
  }

 private:
  bool strip_;
};

// One streamed response: relays the Job's events as server-sent events until the final one.
struct StreamState {
  std::shared_ptr<Job> job;
  ApiRequest req;
  std::string id, model;
  int64_t created;
  ReplyText reply;
  bool sent_role = false, finished = false;

  json chunk(json choice) const {
    return {{"id", id},
            {"object", req.chat ? "chat.completion.chunk" : "text_completion"},
            {"created", created},
            {"model", model},
            {"choices", json::array({std::move(choice)})}};
  }
  json choice(const std::string& text, const std::vector<int32_t>& tokens, const json& finish) const {
    json c = {{"index", 0}, {"finish_reason", finish}};
    if (req.chat) {
      json delta = json::object();
      if (!sent_role) delta["role"] = "assistant";
      if (!text.empty() || !sent_role) delta["content"] = text;
      c["delta"] = delta;
    } else {
      c["text"] = text;
      c["logprobs"] = nullptr;
    }
    if (req.return_token_ids) c["token_ids"] = tokens;
    return c;
  }
};

// Counts a response from its start until it is completely written.
struct InFlight {
  explicit InFlight(std::atomic<int>& n) : n_(n) { ++n_; }
  ~InFlight() { --n_; }
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;
  std::atomic<int>& n_;
};

bool write_event(httplib::DataSink& sink, const std::string& data) {
  const std::string frame = "data: " + data + "\n\n";
  return sink.write(frame.data(), frame.size());
}

}  // namespace

OpenAiServer::OpenAiServer(const Model& model, const Tokenizer& tok, ServerOptions opt)
    : tok_(tok), opt_(std::move(opt)), http_(std::make_unique<HttpListener>()) {
  limits_.model_name = opt_.model_name;
  limits_.n_vocab = model.config().n_vocab;
  limits_.max_tokens_limit = opt_.max_tokens_limit;
  limits_.default_max_tokens = opt_.default_max_tokens;
  limits_.max_context = opt_.max_context;
  limits_.request_timeout = opt_.request_timeout;
  SchedulerOptions so;
  so.n_slots = opt_.max_concurrency;
  so.max_queue = opt_.max_queue;
  so.prefill_chunk = opt_.prefill_chunk;
  so.prefix_cache_bytes = opt_.prefix_cache_bytes;
  auto weights = std::make_shared<const std::vector<uint8_t>>(penalty_weights(tok, limits_.n_vocab));
  sched_ = std::make_unique<Scheduler>(model, &tok, std::move(weights), so);
  created_ = int64_t(std::time(nullptr));
  // Every waiting or streaming request holds an HTTP thread, plus a few for /health and rejections.
  const size_t n_threads = size_t(opt_.max_concurrency) + opt_.max_queue + 4;
  http_->new_task_queue = [n_threads] { return new httplib::ThreadPool(n_threads); };
  http_->set_payload_max_length(opt_.max_body_bytes);
  routes();
}

OpenAiServer::~OpenAiServer() {
  stop();
  sched_->stop();
}

int OpenAiServer::bind(const std::string& host, int port) {
  if (port == 0) {
    port = http_->bind_to_any_port(host);
    if (port < 0) throw Error("cannot listen on " + host + " (any port)");
  } else if (!http_->bind_to_port(host, port)) {
    throw Error("cannot listen on " + host + ":" + std::to_string(port) + " (address in use or not available)");
  }
  http_->raise_backlog();
  return port;
}

void OpenAiServer::run() { http_->listen_after_bind(); }

void OpenAiServer::stop(std::chrono::milliseconds grace) {
  sched_->drain(grace);
  // httplib abandons chunked responses once the listener is closed, so the streams are allowed to
  // finish first; a client that stops reading cannot hold the shutdown beyond a few seconds more.
  const auto give_up = std::chrono::steady_clock::now() + grace + std::chrono::seconds(5);
  while (in_flight_ > 0 && std::chrono::steady_clock::now() < give_up)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  http_->stop();
}

void OpenAiServer::routes() {
  httplib::Server& s = *http_;

  s.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    const Scheduler::Stats st = sched_->stats();
    send_json(res, 200,
              {{"status", "ok"},
               {"model", opt_.model_name},
               {"slots", opt_.max_concurrency},
               {"active", st.active},
               {"queued", st.queued},
               {"completed", st.completed},
               {"steps", st.steps},
               {"max_batch_seqs", st.max_batch_seqs},
               {"prefix_cache",
                {{"entries", st.cache.entries},
                 {"bytes", st.cache.bytes},
                 {"budget", st.cache.budget},
                 {"hits", st.cache.hits},
                 {"misses", st.cache.misses},
                 {"hit_tokens", st.cache.hit_tokens}}}});
  });

  s.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    send_json(res, 200,
              {{"object", "list"},
               {"data", json::array({{{"id", opt_.model_name},
                                      {"object", "model"},
                                      {"created", created_},
                                      {"owned_by", "rwkvx"}}})}});
  });

  auto completion = [this](bool chat) {
    return [this, chat](const httplib::Request& http_req, httplib::Response& res) {
      ApiRequest req;
      std::shared_ptr<Job> job;
      try {
        req = parse_api_request(http_req.body, chat, tok_, limits_);
        job = sched_->submit(req.serve);
      } catch (const ApiError& e) {
        return send_error(res, e);
      } catch (const SchedulerBusy& e) {
        return send_error(res, ApiError(503, e.what(), "", "server_busy", "server_error"));
      }
      // Counted until the response is completely written (the stream's releaser, or scope exit).
      auto in_flight = std::make_shared<InFlight>(in_flight_);
      const std::string id = new_id(chat ? "chatcmpl-" : "cmpl-");
      const int64_t created = int64_t(std::time(nullptr));

      if (!req.stream) {
        std::string text;
        std::vector<int32_t> tokens;
        JobEvent ev, last;
        ReplyText reply(chat);
        while (job->next(ev)) {
          text += reply(std::move(ev.text));
          tokens.insert(tokens.end(), ev.tokens.begin(), ev.tokens.end());
          if (ev.final) last = ev;
        }
        if (!last.error.empty())
          return send_error(res, ApiError(500, "generation failed: " + last.error, "", "engine_error", "server_error"));
        json choice = {{"index", 0}, {"finish_reason", finish_reason_name(last.reason)}};
        if (chat) {
          choice["message"] = {{"role", "assistant"}, {"content", text}};
        } else {
          choice["text"] = text;
          choice["logprobs"] = nullptr;
        }
        if (req.return_token_ids) choice["token_ids"] = tokens;
        return send_json(res, 200,
                         {{"id", id},
                          {"object", chat ? "chat.completion" : "text_completion"},
                          {"created", created},
                          {"model", opt_.model_name},
                          {"choices", json::array({choice})},
                          {"usage", usage_json(last.usage)}});
      }

      auto st = std::make_shared<StreamState>(StreamState{job, req, id, opt_.model_name, created, ReplyText(chat)});
      res.set_header("Cache-Control", "no-cache");
      res.set_chunked_content_provider(
          "text/event-stream",
          [st](size_t, httplib::DataSink& sink) {
            JobEvent ev;
            if (st->finished || !st->job->next(ev)) {
              sink.done();
              return true;
            }
            const std::string text = st->reply(std::move(ev.text));
            if (!text.empty() || !ev.tokens.empty() || (st->req.chat && !st->sent_role)) {
              if (!write_event(sink, st->chunk(st->choice(text, ev.tokens, nullptr)).dump())) return false;
              st->sent_role = true;
            }
            if (ev.final) {
              st->finished = true;
              if (!ev.error.empty()) {
                json err = error_body("generation failed: " + ev.error, "server_error", "", "engine_error");
                if (!write_event(sink, err.dump())) return false;
              } else {
                json last = st->chunk(st->choice("", {}, finish_reason_name(ev.reason)));
                if (st->req.chat) last["choices"][0]["delta"] = json::object();
                if (!write_event(sink, last.dump())) return false;
                if (st->req.include_usage) {
                  json u = st->chunk(json());
                  u["choices"] = json::array();
                  u["usage"] = usage_json(ev.usage);
                  if (!write_event(sink, u.dump())) return false;
                }
              }
              if (!write_event(sink, "[DONE]")) return false;
              sink.done();
            }
            return true;
          },
          [st, in_flight](bool success) {
            // A client that hung up mid-stream frees its slot at the scheduler's next step.
            if (!success || !st->finished) st->job->cancel();
          });
    };
  };
  s.Post("/v1/completions", completion(false));
  s.Post("/v1/chat/completions", completion(true));

  // Anything else that ends in an error status without a body (unknown routes, 413 from the body
  // limit, 400 from unparsable HTTP) gets an OpenAI-style error object too.
  s.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    std::string code = "http_" + std::to_string(res.status), message = "HTTP error " + std::to_string(res.status);
    if (res.status == 404) message = "no route for " + req.method + " " + req.path, code = "not_found";
    if (res.status == 413) message = "the request body is too large", code = "request_too_large";
    send_json(res, res.status, error_body(message, "invalid_request_error", "", code));
  });
  s.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "internal error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    send_json(res, 500, error_body(what, "server_error", "", "internal_error"));
  });
}

}  // namespace rwkvx
