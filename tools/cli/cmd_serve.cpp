// `rwkvx serve`: the OpenAI-compatible HTTP server (src/server/http_server.h). SIGINT and SIGTERM stop
// it gracefully: no new connections, running requests get --shutdown-grace seconds to finish.
#include <pthread.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "commands.h"
#include "core/error.h"
#include "model_args.h"
#include "runtime/engine.h"
#include "runtime/tokenizer.h"
#include "server/http_server.h"

namespace rwkvx {
namespace {

struct ServeArgs {
  ModelArgs model;
  std::string vocab, host = "127.0.0.1", model_name;
  int port = 8000;
  double request_timeout_s = 600, shutdown_grace_s = 10;
  size_t max_body_kib = 1024, prefix_cache_mib = 512;
  ServerOptions server;
};

void run_serve(ServeArgs& a) {
  // Signals are taken by one thread with sigwait, so every other thread (HTTP workers, scheduler)
  // must start with them blocked.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  Tokenizer tok = Tokenizer::load(a.vocab.empty() ? default_vocab_path() : a.vocab);
  auto backend = make_backend(a.model.device, a.model.int8);
  LoadedModel lm = load_model(a.model.path, a.model.options, *backend);
  ServerOptions opt = a.server;
  opt.model_name = a.model_name.empty() ? std::filesystem::path(a.model.path).stem().string() : a.model_name;
  opt.request_timeout = std::chrono::milliseconds(int64_t(a.request_timeout_s * 1000));
  opt.max_body_bytes = a.max_body_kib << 10;
  opt.prefix_cache_bytes = a.prefix_cache_mib << 20;
  if (opt.max_context < 2) throw Error("--max-context must be at least 2");
  OpenAiServer server(*lm.model, tok, opt);
  const int port = server.bind(a.host, a.port);
  std::fprintf(stderr, "rwkvx serve: model '%s' (%s) on http://%s:%d/v1 with %d slots\n", opt.model_name.c_str(),
               a.model.path.c_str(), a.host.c_str(), port, opt.max_concurrency);

  const auto grace = std::chrono::milliseconds(int64_t(a.shutdown_grace_s * 1000));
  std::atomic<bool> done{false};
  std::thread signals([&] {
    int sig = 0;
    sigwait(&sigs, &sig);
    if (done) return;  // woken by our own shutdown below
    std::fprintf(stderr, "rwkvx serve: %s, finishing running requests (up to %.0f s)\n",
                 sig == SIGINT ? "SIGINT" : "SIGTERM", a.shutdown_grace_s);
    server.stop(grace);
  });
  server.run();
  // run() also returns if listening fails; wake the signal thread so it can be joined.
  done = true;
  pthread_kill(signals.native_handle(), SIGTERM);
  signals.join();
  std::fprintf(stderr, "rwkvx serve: stopped\n");
}

}  // namespace
}  // namespace rwkvx

void register_serve_commands(CLI::App& app) {
  using namespace rwkvx;
  static ServeArgs a;
  CLI::App* cmd = app.add_subcommand("serve", "OpenAI-compatible HTTP server (completions, chat, streaming)");
  add_model_args(cmd, a.model);
  add_device_arg(cmd, a.model);
  ServerOptions& s = a.server;
  cmd->add_option("--vocab", a.vocab, "vocabulary file (default: $RWKVX_VOCAB or the bundled World vocab)");
  cmd->add_option("--host", a.host, "address to listen on")->default_val("127.0.0.1");
  cmd->add_option("--port", a.port, "TCP port (0 = any free port)")->check(CLI::Range(0, 65535))->default_val(8000);
  cmd->add_option("--model-name", a.model_name, "model id clients must use (default: the file name without extension)");
  cmd->add_option("--max-concurrency", s.max_concurrency, "requests decoded together (state slots)")
      ->check(CLI::Range(1, 1024))
      ->default_val(8);
  cmd->add_option("--max-queue", s.max_queue, "requests waiting for a slot before new ones get 503")->default_val(64);
  cmd->add_option("--max-tokens-limit", s.max_tokens_limit, "largest max_tokens a request may ask for")
      ->check(CLI::PositiveNumber)
      ->default_val(4096);
  cmd->add_option("--default-max-tokens", s.default_max_tokens, "max_tokens of requests that give none")
      ->check(CLI::PositiveNumber)
      ->default_val(256);
  cmd->add_option("--max-context", s.max_context, "prompt + completion tokens per request")
      ->check(CLI::PositiveNumber)
      ->default_val(32768);
  cmd->add_option("--request-timeout", a.request_timeout_s, "seconds a request may take, queueing included")
      ->check(CLI::PositiveNumber)
      ->default_val(600);
  cmd->add_option("--max-body-kib", a.max_body_kib, "largest request body (KiB); larger ones get 413")
      ->check(CLI::PositiveNumber)
      ->default_val(1024);
  cmd->add_option("--prefill-chunk", s.prefill_chunk, "prompt tokens per batched step, over all requests")
      ->check(CLI::PositiveNumber)
      ->default_val(256);
  cmd->add_option("--prefix-cache-mib", a.prefix_cache_mib, "memory for cached prefix states (0 = off)")
      ->default_val(512);
  cmd->add_option("--shutdown-grace", a.shutdown_grace_s, "seconds running requests get after SIGINT/SIGTERM")
      ->default_val(10);
  cmd->callback([] { run_serve(a); });
}
