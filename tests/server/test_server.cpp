// End to end: the OpenAI-compatible server on loopback (ephemeral port) driven by a real HTTP client
// (httplib::Client). Completions and chat, streaming (server-sent events) and not; 16 concurrent
// streams equal 16 sequential runs with the same seeds and equal an in-process Session; a second chat
// turn restores the cached prefix (usage.prompt_tokens_cached); every bad request gets its 4xx with an
// OpenAI error object while the server keeps serving; disconnects, timeouts and shutdown.
#include <gtest/gtest.h>
#include <httplib.h>

#include <nlohmann/json.hpp>
#include <thread>

#include "runtime/engine.h"
#include "runtime/session.h"
#include "runtime/tokenizer.h"
#include "server/http_server.h"
#include "support/random_model.h"

namespace rwkvx {
namespace {

using nlohmann::json;

// A model with the World vocabulary but tiny width (and one sparse block) so text round-trips and a
// step costs about a millisecond.
RandomModelSpec world_spec() {
  RandomModelSpec s;
  s.n_vocab = 65536, s.n_embd = 64, s.n_rwkv = 2, s.n_sparse = 1, s.seed = 61;
  return s;
}

ServerOptions small_limits() {
  ServerOptions o;
  o.model_name = "tiny";
  o.max_concurrency = 16;
  o.max_queue = 32;
  o.max_tokens_limit = 64;
  o.default_max_tokens = 16;
  o.max_context = 256;
  o.max_body_bytes = 64 << 10;
  o.prefill_chunk = 64;
  return o;
}

struct Running {
  Running(const Model& m, const Tokenizer& tok, ServerOptions opt) : server(m, tok, std::move(opt)) {
    port = server.bind("127.0.0.1", 0);
    thread = std::thread([this] { server.run(); });
  }
  ~Running() {
    server.stop();
    thread.join();
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(60, 0);
    return c;
  }
  OpenAiServer server;
  int port = 0;
  std::thread thread;
};

struct Sse {
  std::vector<json> chunks;
  bool done = false;
  int status = 0;
  std::string text;
  std::vector<int32_t> tokens;
  json usage, finish_reason;
};

class ServerTest : public testing::Test {
 protected:
  static void SetUpTestSuite() {
    be = make_reference_backend().release();
    tok = new Tokenizer(Tokenizer::load(default_vocab_path()));
    ModelOptions opt;
    opt.chunk = 16;
    model = test::load_random_model(world_spec(), opt, *be).release();
    srv = new Running(*model, *tok, small_limits());
  }
  static void TearDownTestSuite() {
    delete srv;
    delete model;
    delete tok;
    delete be;
  }

  static json post(const std::string& path, const json& body, int* status = nullptr) {
    return post_raw(path, body.dump(), status);
  }
  static json post_raw(const std::string& path, const std::string& body, int* status = nullptr) {
    auto res = srv->client().Post(path.c_str(), body, "application/json");
    EXPECT_TRUE(res) << "no response for " << path;
    if (!res) return {};
    if (status) *status = res->status;
    return json::parse(res->body);
  }
  static Sse stream(const std::string& path, json body, bool stop_after_first = false) {
    body["stream"] = true;
    Sse out;
    std::string buf;
    httplib::Request req;
    req.method = "POST";
    req.path = path;
    req.headers = {{"Content-Type", "application/json"}};
    req.body = body.dump();
    req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
      buf.append(d, n);
      for (size_t end; (end = buf.find("\n\n")) != std::string::npos;) {
        const std::string ev = buf.substr(0, end);
        buf.erase(0, end + 2);
        EXPECT_EQ(ev.rfind("data: ", 0), 0u) << ev;
        const std::string data = ev.substr(6);
        if (data == "[DONE]") {
          out.done = true;
          continue;
        }
        json j = json::parse(data);
        out.chunks.push_back(j);
        if (j.contains("usage") && !j["usage"].is_null()) out.usage = j["usage"];
        if (j.contains("choices") && !j["choices"].empty()) {
          const json& c = j["choices"][0];
          if (c.contains("text")) out.text += c["text"].get<std::string>();
          if (c.contains("delta") && c["delta"].contains("content"))
            out.text += c["delta"]["content"].get<std::string>();
          if (c.contains("token_ids"))
            for (int32_t t : c["token_ids"]) out.tokens.push_back(t);
          if (!c["finish_reason"].is_null()) out.finish_reason = c["finish_reason"];
        }
        if (stop_after_first) return false;
      }
      return true;
    };
    auto res = srv->client().send(req);
    if (res) out.status = res->status;
    return out;
  }

  static Backend* be;
  static Tokenizer* tok;
  static Model* model;
  static Running* srv;
};
Backend* ServerTest::be = nullptr;
Tokenizer* ServerTest::tok = nullptr;
Model* ServerTest::model = nullptr;
Running* ServerTest::srv = nullptr;

json completion(const std::string& prompt, uint64_t seed, int max_tokens = 12) {
  return {{"model", "tiny"}, {"prompt", prompt},    {"max_tokens", max_tokens},
          {"seed", seed},    {"temperature", 0.9}, {"return_token_ids", true}};
}

TEST_F(ServerTest, HealthAndModels) {
  auto c = srv->client();
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  EXPECT_EQ(json::parse(h->body)["status"], "ok");
  auto m = c.Get("/v1/models");
  ASSERT_TRUE(m);
  json models = json::parse(m->body);
  EXPECT_EQ(models["object"], "list");
  EXPECT_EQ(models["data"][0]["id"], "tiny");
}

TEST_F(ServerTest, CompletionMatchesAnInProcessSessionAndItsStream) {
  int status = 0;
  json r = post("/v1/completions", completion("Once upon a time", 5), &status);
  ASSERT_EQ(status, 200) << r.dump();
  EXPECT_EQ(r["object"], "text_completion");
  const json& choice = r["choices"][0];
  const std::vector<int32_t> ids = choice["token_ids"].get<std::vector<int32_t>>();
  EXPECT_EQ(r["usage"]["prompt_tokens"], tok->encode("Once upon a time").size());
  EXPECT_EQ(r["usage"]["completion_tokens"], ids.size());
  EXPECT_EQ(r["usage"]["total_tokens"], r["usage"]["prompt_tokens"].get<int>() + int(ids.size()));
  EXPECT_EQ(choice["finish_reason"], "length");

  // The same sampling in a Session: the batched server is the same computation.
  Session s(*model, "", tok);
  s.append(tok->encode("Once upon a time"));
  SamplingParams p;
  p.seed = 5;
  p.temperature = 0.9f;
  p.top_p = 1;
  p.presence_penalty = p.frequency_penalty = 0;
  GenerationResult g = s.generate(p, 12, {});
  EXPECT_EQ(ids, g.tokens);
  EXPECT_EQ(choice["text"], g.text);

  json body = completion("Once upon a time", 5);
  body["stream_options"] = {{"include_usage", true}};
  Sse st = stream("/v1/completions", body);
  EXPECT_EQ(st.status, 200);
  EXPECT_TRUE(st.done);
  EXPECT_EQ(st.text, g.text);
  EXPECT_EQ(st.tokens, g.tokens);
  EXPECT_EQ(st.finish_reason, "length");
  EXPECT_EQ(st.usage["completion_tokens"], 12);
  // The identical prompt was cached with its next-token logits: nothing was prefilled again.
  EXPECT_EQ(st.usage["prompt_tokens_cached"], st.usage["prompt_tokens"]);
  EXPECT_EQ(st.usage["prompt_tokens_details"]["cached_tokens"], st.usage["prompt_tokens"]);
}

TEST_F(ServerTest, ChatStreamingAndNot) {
  json body = {{"model", "tiny"},
               {"messages", {{{"role", "user"}, {"content", "Hello!"}}}},
               {"max_tokens", 10},
               {"seed", 3},
               {"return_token_ids", true}};
  int status = 0;
  json r = post("/v1/chat/completions", body, &status);
  ASSERT_EQ(status, 200) << r.dump();
  EXPECT_EQ(r["object"], "chat.completion");
  EXPECT_EQ(r["choices"][0]["message"]["role"], "assistant");
  const std::string content = r["choices"][0]["message"]["content"];
  EXPECT_EQ(r["usage"]["prompt_tokens"], tok->encode("User: Hello!\n\nAssistant:").size());
  Sse st = stream("/v1/chat/completions", body);
  EXPECT_EQ(st.status, 200);
  EXPECT_TRUE(st.done);
  ASSERT_FALSE(st.chunks.empty());
  EXPECT_EQ(st.chunks[0]["object"], "chat.completion.chunk");
  EXPECT_EQ(st.chunks[0]["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(st.text, content);
  EXPECT_EQ(st.tokens, r["choices"][0]["token_ids"].get<std::vector<int32_t>>());
  EXPECT_EQ(st.finish_reason, r["choices"][0]["finish_reason"]);
}

TEST_F(ServerTest, SecondChatTurnReusesTheCachedPrefix) {
  json turn1 = {{"model", "tiny"}, {"messages", {{{"role", "user"}, {"content", "Name three colours."}}}},
                {"max_tokens", 8}, {"seed", 21}};
  json r1 = post("/v1/chat/completions", turn1);
  const std::string reply = r1["choices"][0]["message"]["content"];
  json turn2 = turn1;
  turn2["messages"].push_back({{"role", "assistant"}, {"content", reply}});
  turn2["messages"].push_back({{"role", "user"}, {"content", "And three more?"}});
  json r2 = post("/v1/chat/completions", turn2);
  const int64_t first_prompt = int64_t(tok->encode("User: Name three colours.\n\nAssistant:").size());
  EXPECT_GE(r2["usage"]["prompt_tokens_cached"].get<int64_t>(), first_prompt) << r2["usage"].dump();
  EXPECT_LT(r2["usage"]["prompt_tokens_cached"].get<int64_t>(), r2["usage"]["prompt_tokens"].get<int64_t>());
}

TEST_F(ServerTest, ConcurrentStreamsEqualSequentialRuns) {
  const int n = 16;
  std::vector<Sse> concurrent(n);
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      concurrent[size_t(i)] = stream("/v1/completions", completion("Request " + std::to_string(i) + " says", 100 + i, 12));
    });
  for (auto& t : threads) t.join();
  const json health = json::parse(srv->client().Get("/health")->body);
  EXPECT_GT(health["max_batch_seqs"].get<int>(), 1) << "requests were never batched together";
  for (int i = 0; i < n; ++i) {
    SCOPED_TRACE("request " + std::to_string(i));
    int status = 0;
    json r = post("/v1/completions", completion("Request " + std::to_string(i) + " says", 100 + i, 12), &status);
    ASSERT_EQ(status, 200);
    EXPECT_TRUE(concurrent[size_t(i)].done);
    EXPECT_EQ(concurrent[size_t(i)].tokens, r["choices"][0]["token_ids"].get<std::vector<int32_t>>());
    EXPECT_EQ(concurrent[size_t(i)].text, r["choices"][0]["text"]);
    EXPECT_EQ(concurrent[size_t(i)].tokens.size(), 12u);
  }
}

TEST_F(ServerTest, BadRequestsGetTheirErrorsAndTheServerKeepsServing) {
  struct Bad {
    const char* path;
    std::string body;
    int status;
    const char* code;   // expected error.code ("" = any)
    const char* param;  // expected error.param ("" = null)
  };
  const std::string long_prompt(20000, 'x');  // about 2500 tokens
  const std::vector<Bad> cases = {
      {"/v1/completions", "{not json", 400, "invalid_json", ""},
      {"/v1/completions", "[1, 2]", 400, "invalid_json", ""},
      {"/v1/completions", R"({"prompt": "hi", "model": "gpt-4"})", 404, "model_not_found", "model"},
      {"/v1/completions", R"({"prompt": "hi", "model": 7})", 400, "invalid_type", "model"},
      {"/v1/completions", R"({"model": "tiny"})", 400, "missing_field", "prompt"},
      {"/v1/completions", R"({"prompt": 42})", 400, "invalid_type", "prompt"},
      {"/v1/completions", R"({"prompt": ""})", 400, "invalid_value", "prompt"},
      {"/v1/completions", R"({"prompt": [1, -5]})", 400, "invalid_value", "prompt"},
      {"/v1/completions", R"({"prompt": [70000]})", 400, "invalid_value", "prompt"},
      {"/v1/completions", R"({"prompt": "hi", "max_tokens": "ten"})", 400, "invalid_type", "max_tokens"},
      {"/v1/completions", R"({"prompt": "hi", "max_tokens": 0})", 400, "invalid_value", "max_tokens"},
      {"/v1/completions", R"({"prompt": "hi", "max_tokens": 100000})", 400, "invalid_value", "max_tokens"},
      {"/v1/completions", R"({"prompt": "hi", "temperature": "hot"})", 400, "invalid_type", "temperature"},
      {"/v1/completions", R"({"prompt": "hi", "temperature": -1})", 400, "invalid_value", "temperature"},
      {"/v1/completions", R"({"prompt": "hi", "top_p": 1.5})", 400, "invalid_value", "top_p"},
      {"/v1/completions", R"({"prompt": "hi", "top_k": -2})", 400, "invalid_value", "top_k"},
      {"/v1/completions", R"({"prompt": "hi", "presence_penalty": 9})", 400, "invalid_value", "presence_penalty"},
      {"/v1/completions", R"({"prompt": "hi", "stream": "yes"})", 400, "invalid_type", "stream"},
      {"/v1/completions", R"({"prompt": "hi", "stop": [""]})", 400, "invalid_value", "stop"},
      {"/v1/completions", R"({"prompt": "hi", "stop": 5})", 400, "invalid_type", "stop"},
      {"/v1/completions", R"({"prompt": "hi", "seed": "abc"})", 400, "invalid_type", "seed"},
      {"/v1/completions", R"({"prompt": "hi", "n": 2})", 400, "invalid_value", "n"},
      {"/v1/completions", R"({"prompt": "hi", "stop_token_ids": [99999]})", 400, "invalid_value", "stop_token_ids"},
      {"/v1/completions", R"({"prompt": ")" + long_prompt + R"("})", 400, "context_length_exceeded", "prompt"},
      {"/v1/chat/completions", R"({"messages": "hi"})", 400, "invalid_type", "messages"},
      {"/v1/chat/completions", R"({"messages": []})", 400, "invalid_type", "messages"},
      {"/v1/chat/completions", R"({"messages": [{"role": "wizard", "content": "x"}]})", 400, "invalid_value",
       "messages[0].role"},
      {"/v1/chat/completions", R"({"messages": [{"role": "user", "content": 3}]})", 400, "invalid_type",
       "messages[0].content"},
      {"/v1/chat/completions", R"({"messages": [{"role": "user"}]})", 400, "missing_field", "messages[0].content"},
      {"/v1/completions", "{\"prompt\": \"" + std::string(70 << 10, 'a') + "\"}", 413, "request_too_large", ""},
  };
  for (const Bad& b : cases) {
    SCOPED_TRACE(std::string(b.path) + " " + b.body.substr(0, 80));
    auto res = srv->client().Post(b.path, b.body, "application/json");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, b.status) << res->body;
    json e = json::parse(res->body, nullptr, false);
    ASSERT_TRUE(e.is_object() && e.contains("error")) << res->body;
    EXPECT_TRUE(e["error"]["message"].is_string());
    EXPECT_TRUE(e["error"]["type"].is_string());
    if (*b.code) {
      EXPECT_EQ(e["error"]["code"], b.code);
    }
    if (*b.param) {
      EXPECT_EQ(e["error"]["param"], b.param);
    } else {
      EXPECT_TRUE(e["error"]["param"].is_null());
    }
  }
  auto nf = srv->client().Get("/v1/nothing");
  ASSERT_TRUE(nf);
  EXPECT_EQ(nf->status, 404);
  EXPECT_EQ(json::parse(nf->body)["error"]["code"], "not_found");
  // Still serving.
  int status = 0;
  json ok = post("/v1/completions", completion("still there?", 1, 3), &status);
  EXPECT_EQ(status, 200) << ok.dump();
  EXPECT_EQ(ok["usage"]["completion_tokens"], 3);
}

TEST_F(ServerTest, ClientThatHangsUpFreesItsSlot) {
  Sse st = stream("/v1/completions", completion("A long story", 9, 64), /*stop_after_first=*/true);
  EXPECT_FALSE(st.done);
  bool idle = false;
  for (int i = 0; i < 500 && !idle; ++i) {
    idle = json::parse(srv->client().Get("/health")->body)["active"] == 0;
    if (!idle) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(idle) << "the abandoned request still holds a slot";
}

TEST_F(ServerTest, RequestTimeoutAndGracefulShutdown) {
  ServerOptions o = small_limits();
  o.request_timeout = std::chrono::milliseconds(1);
  auto r = std::make_unique<Running>(*model, *tok, o);
  auto res = r->client().Post("/v1/completions", completion("slow", 1, 64).dump(), "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(json::parse(res->body)["choices"][0]["finish_reason"], "timeout");

  // Shutdown while a stream runs: the stream still ends properly ([DONE]) and run() returns.
  o.request_timeout = std::chrono::milliseconds(60000);
  auto r2 = std::make_unique<Running>(*model, *tok, o);
  httplib::Client c = r2->client();
  std::atomic<bool> started{false}, done{false};
  std::string body;
  std::thread client([&] {
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.headers = {{"Content-Type", "application/json"}};
    json b = completion("shutdown test", 2, 64);
    b["stream"] = true;
    req.body = b.dump();
    req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
      body.append(d, n);
      started = true;
      return true;
    };
    c.send(req);
    done = true;
  });
  while (!started) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  r2->server.stop(std::chrono::milliseconds(0));
  client.join();
  r2.reset();  // joins run()
  EXPECT_TRUE(done);
  EXPECT_NE(body.find("data: [DONE]"), std::string::npos) << body;
  EXPECT_NE(body.find("\"finish_reason\""), std::string::npos);
}

}  // namespace
}  // namespace rwkvx
