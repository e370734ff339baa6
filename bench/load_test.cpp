// Bounded load test for `rwkvx serve` (scripts/load_test.sh runs it end to end): N concurrent clients
// send streaming requests (completions and chat, alternating) over loopback for a fixed time, then it
// reports completed requests, failures, generated tokens per second, latency percentiles (first token
// and whole request) and the server's resident memory sampled over the run (flat = no leak). Only
// loopback addresses are accepted. `--write-model F` writes the tiny random model it is meant for.
#include <httplib.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "model/formats/safetensors_writer.h"
#include "model/random_init.h"

namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

struct Args {
  std::string host = "127.0.0.1", model_name = "tiny", write_model;
  int port = 0, clients = 32, max_tokens = 32, server_pid = 0;
  double seconds = 60;
};

struct Outcome {
  bool ok = false;
  std::string error;
  int tokens = 0;
  double first_token_s = 0, total_s = 0;
};

long rss_kib(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  long v = -1;
  while (in >> key) {
    if (key == "VmRSS:") {
      in >> v;
      return v;
    }
    in.ignore(1 << 12, '\n');
  }
  return -1;
}

Outcome one_request(const Args& a, int client, int k) {
  Outcome o;
  json body = {{"model", a.model_name}, {"max_tokens", a.max_tokens}, {"stream", true},
               {"seed", client * 100000 + k}, {"return_token_ids", true}, {"temperature", 1.0}};
  const bool chat = k % 2;
  const std::string topic = "client " + std::to_string(client) + " request " + std::to_string(k);
  if (chat) {
    body["messages"] = {{{"role", "user"}, {"content", "Tell me about " + topic}}};
  } else {
    body["prompt"] = "A short story about " + topic + ":";
  }
  httplib::Client cli(a.host, a.port);
  cli.set_read_timeout(120, 0);
  httplib::Request req;
  req.method = "POST";
  req.path = chat ? "/v1/chat/completions" : "/v1/completions";
  req.headers = {{"Content-Type", "application/json"}};
  req.body = body.dump();
  std::string buf;
  bool done = false;
  const auto t0 = Clock::now();
  req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
    buf.append(d, n);
    for (size_t end; (end = buf.find("\n\n")) != std::string::npos;) {
      const std::string ev = buf.substr(0, end);
      buf.erase(0, end + 2);
      if (ev == "data: [DONE]") {
        done = true;
        continue;
      }
      json j = json::parse(ev.substr(6), nullptr, false);
      if (j.is_discarded() || j.contains("error")) return false;
      if (!j["choices"].empty() && j["choices"][0].contains("token_ids")) {
        if (o.tokens == 0) o.first_token_s = std::chrono::duration<double>(Clock::now() - t0).count();
        o.tokens += int(j["choices"][0]["token_ids"].size());
      }
    }
    return true;
  };
  auto res = cli.send(req);
  o.total_s = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!res) o.error = "connection error " + std::to_string(int(res.error()));
  else if (res->status != 200) o.error = "HTTP " + std::to_string(res->status);
  else if (!done) o.error = "stream ended without [DONE]";
  o.ok = o.error.empty();
  return o;
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, size_t(q * double(v.size())))];
}

int run(const Args& a) {
  if (a.host != "127.0.0.1" && a.host != "localhost" && a.host != "::1") {
    std::fprintf(stderr, "error: the load test only targets loopback addresses\n");
    return 1;
  }
  std::vector<Outcome> outcomes;
  std::mutex mu;
  std::vector<std::pair<double, long>> rss;  // (seconds, KiB)
  const Clock::time_point t0 = Clock::now();
  const Clock::time_point stop_at = t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(a.seconds));
  std::atomic<bool> running{true};
  std::thread sampler([&] {
    while (running) {
      if (a.server_pid) rss.emplace_back(std::chrono::duration<double>(Clock::now() - t0).count(), rss_kib(a.server_pid));
      for (int i = 0; i < 20 && running; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  std::vector<std::thread> clients;
  for (int c = 0; c < a.clients; ++c)
    clients.emplace_back([&, c] {
      for (int k = 0; Clock::now() < stop_at; ++k) {
        Outcome o = one_request(a, c, k);
        std::lock_guard<std::mutex> lock(mu);
        outcomes.push_back(o);
        if (!o.ok && outcomes.size() < 1000) std::fprintf(stderr, "client %d request %d failed: %s\n", c, k, o.error.c_str());
      }
    });
  for (auto& t : clients) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
  running = false;
  sampler.join();
  if (a.server_pid) rss.emplace_back(wall, rss_kib(a.server_pid));

  size_t ok = 0, failed = 0;
  long long tokens = 0;
  std::vector<double> ttft, total;
  for (const Outcome& o : outcomes) {
    if (!o.ok) {
      ++failed;
      continue;
    }
    ++ok;
    tokens += o.tokens;
    ttft.push_back(o.first_token_s);
    total.push_back(o.total_s);
  }
  std::printf("clients %d, duration %.1f s (requests started until %.0f s), max_tokens %d\n", a.clients, wall,
              a.seconds, a.max_tokens);
  std::printf("requests completed %zu, failed %zu\n", ok, failed);
  std::printf("generated tokens %lld, %.1f tokens/s, %.2f requests/s\n", tokens, double(tokens) / wall,
              double(ok) / wall);
  std::printf("first token latency p50 %.3f s, p99 %.3f s\n", percentile(ttft, 0.5), percentile(ttft, 0.99));
  std::printf("request latency     p50 %.3f s, p99 %.3f s\n", percentile(total, 0.5), percentile(total, 0.99));
  if (a.server_pid && !rss.empty()) {
    // The first samples include start-up growth (allocator pools, first KV caches, prefix cache filling).
    long hi = rss.front().second;
    for (auto& [t, kib] : rss) hi = std::max(hi, kib);
    auto at = [&](double f) { return rss[std::min(rss.size() - 1, size_t(f * double(rss.size())))].second / 1024.0; };
    std::printf("server RSS before %.1f MiB; at 25%% %.1f, 50%% %.1f, 75%% %.1f of the run; end %.1f MiB "
                "(max %.1f over %zu samples)\n",
                rss.front().second / 1024.0, at(0.25), at(0.5), at(0.75), rss.back().second / 1024.0, hi / 1024.0,
                rss.size());
  }
  return failed == 0 && ok > 0 ? 0 : 2;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"load test for rwkvx serve (loopback only)"};
  Args a;
  app.add_option("--host", a.host, "server address (loopback only)");
  app.add_option("--port", a.port, "server port");
  app.add_option("--model-name", a.model_name, "model id the server serves");
  app.add_option("--clients", a.clients, "concurrent streaming clients");
  app.add_option("--seconds", a.seconds, "how long clients start new requests");
  app.add_option("--max-tokens", a.max_tokens, "max_tokens per request");
  app.add_option("--server-pid", a.server_pid, "pid of the server, to sample its RSS");
  app.add_option("--write-model", a.write_model, "write the tiny test model (World vocab, width 64) and exit");
  CLI11_PARSE(app, argc, argv);
  if (!a.write_model.empty()) {
    rwkvx::RandomModelSpec s;
    s.n_vocab = 65536, s.n_embd = 64, s.n_rwkv = 2, s.n_sparse = 1, s.seed = 7;
    rwkvx::save_safetensors(a.write_model, rwkvx::make_random_model(s));
    return 0;
  }
  if (a.port <= 0) {
    std::fprintf(stderr, "error: --port is required\n");
    return 1;
  }
  return run(a);
}
