// Request validation and the chat template of the OpenAI-compatible API (see openai_api.h).
#include "server/openai_api.h"

#include <cmath>
#include <random>

#include "runtime/tokenizer.h"

namespace rwkvx {
namespace {

using nlohmann::json;

ApiError bad(const std::string& param, const std::string& message, const std::string& code = "invalid_value") {
  return ApiError(400, message, param, code);
}

// Field accessors: absent and null both mean "not given" (clients send null for unset options).
const json* field(const json& obj, const char* key) {
  auto it = obj.find(key);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}

double number_in(const json& obj, const char* key, double def, double lo, double hi) {
  const json* v = field(obj, key);
  if (!v) return def;
  if (!v->is_number()) throw bad(key, std::string("'") + key + "' must be a number", "invalid_type");
  const double d = v->get<double>();
  if (!std::isfinite(d) || d < lo || d > hi)
    throw bad(key, std::string("'") + key + "' must be between " + json(lo).dump() + " and " + json(hi).dump() +
                       ", got " + v->dump());
  return d;
}

int64_t integer_in(const json& obj, const char* key, int64_t def, int64_t lo, int64_t hi) {
  const json* v = field(obj, key);
  if (!v) return def;
  if (!v->is_number_integer()) throw bad(key, std::string("'") + key + "' must be an integer", "invalid_type");
  if (v->is_number_unsigned() && v->get<uint64_t>() > uint64_t(INT64_MAX))
    throw bad(key, std::string("'") + key + "' is out of range");
  const int64_t i = v->get<int64_t>();
  if (i < lo || i > hi)
    throw bad(key, std::string("'") + key + "' must be between " + std::to_string(lo) + " and " + std::to_string(hi) +
                       ", got " + std::to_string(i));
  return i;
}

bool boolean(const json& obj, const char* key, bool def) {
  const json* v = field(obj, key);
  if (!v) return def;
  if (!v->is_boolean()) throw bad(key, std::string("'") + key + "' must be true or false", "invalid_type");
  return v->get<bool>();
}

std::vector<int32_t> token_ids(const json& v, const char* key, int64_t n_vocab) {
  if (!v.is_array()) throw bad(key, std::string("'") + key + "' must be an array of token ids", "invalid_type");
  std::vector<int32_t> ids;
  for (const json& x : v) {
    if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() >= n_vocab)
      throw bad(key, std::string("'") + key + "' holds " + x.dump() + ", not a token id in [0, " +
                         std::to_string(n_vocab) + ")");
    ids.push_back(int32_t(x.get<int64_t>()));
  }
  return ids;
}

std::string message_text(const json& content, size_t index) {
  const std::string param = "messages[" + std::to_string(index) + "].content";
  if (content.is_string()) return content.get<std::string>();
  // The array form: [{"type": "text", "text": "..."}, ...].
  if (content.is_array()) {
    std::string text;
    for (const json& part : content) {
      if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") || !part["text"].is_string())
        throw bad(param, "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported", "invalid_type");
      text += part["text"].get<std::string>();
    }
    return text;
  }
  throw bad(param, "'" + param + "' must be a string or an array of text parts", "invalid_type");
}

void parse_sampling(const json& body, const ApiLimits& limits, SamplingParams& p) {
  // OpenAI's defaults and ranges; top_k and penalty_decay are RWKV extensions.
  p.temperature = float(number_in(body, "temperature", 1.0, 0.0, 2.0));
  p.top_p = float(number_in(body, "top_p", 1.0, 0.0, 1.0));
  p.top_k = int(integer_in(body, "top_k", 0, 0, limits.n_vocab));
  p.presence_penalty = float(number_in(body, "presence_penalty", 0.0, -2.0, 2.0));
  p.frequency_penalty = float(number_in(body, "frequency_penalty", 0.0, -2.0, 2.0));
  p.penalty_decay = float(number_in(body, "penalty_decay", 0.996, 0.0, 1.0));
  if (const json* s = field(body, "seed")) {
    if (!s->is_number_integer()) throw bad("seed", "'seed' must be an integer", "invalid_type");
    p.seed = s->is_number_unsigned() ? s->get<uint64_t>() : uint64_t(s->get<int64_t>());
  } else {
    std::random_device rd;
    p.seed = (uint64_t(rd()) << 32) ^ rd();
  }
  if (const json* s = field(body, "stop")) {
    if (s->is_string()) {
      p.stop_strings.push_back(s->get<std::string>());
    } else if (s->is_array() && s->size() <= 16) {
      for (const json& x : *s) {
        if (!x.is_string()) throw bad("stop", "'stop' must be a string or an array of strings", "invalid_type");
        p.stop_strings.push_back(x.get<std::string>());
      }
    } else {
      throw bad("stop", "'stop' must be a string or an array of at most 16 strings", "invalid_type");
    }
    for (const std::string& x : p.stop_strings)
      if (x.empty()) throw bad("stop", "'stop' strings must not be empty");
  }
  if (const json* s = field(body, "stop_token_ids")) p.stop_tokens = token_ids(*s, "stop_token_ids", limits.n_vocab);
  if (const json* s = field(body, "ban_token_ids")) p.ban_tokens = token_ids(*s, "ban_token_ids", limits.n_vocab);
}

}  // namespace

json error_body(const std::string& message, const std::string& type, const std::string& param,
                const std::string& code) {
  return {{"error",
           {{"message", message},
            {"type", type},
            {"param", param.empty() ? json(nullptr) : json(param)},
            {"code", code.empty() ? json(nullptr) : json(code)}}}};
}

std::string render_chat_prompt(const json& messages) {
  if (!messages.is_array() || messages.empty())
    throw bad("messages", "'messages' must be a non-empty array of {\"role\", \"content\"} objects", "invalid_type");
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const json& m = messages[i];
    const std::string param = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) throw bad(param, "'" + param + "' must be an object", "invalid_type");
    const json* role = field(m, "role");
    if (!role || !role->is_string()) throw bad(param + ".role", "'" + param + ".role' must be a string", "invalid_type");
    const std::string r = role->get<std::string>();
    const char* name = r == "system" || r == "developer" ? "System"
                       : r == "user"                     ? "User"
                       : r == "assistant"                ? "Assistant"
                                                         : nullptr;
    if (!name)
      throw bad(param + ".role", "unsupported role '" + r + "' (system, developer, user and assistant are supported)");
    const json* content = field(m, "content");
    if (!content) throw bad(param + ".content", "'" + param + ".content' is missing", "missing_field");
    out += std::string(name) + ": " + clean_chat_message(message_text(*content, i)) + "\n\n";
  }
  return out + "Assistant:";
}

ApiRequest parse_api_request(const std::string& body_text, bool chat, const Tokenizer& tok, const ApiLimits& limits) {
  json body;
  try {
    body = json::parse(body_text);
  } catch (const json::exception& e) {
    throw ApiError(400, std::string("the request body is not valid JSON: ") + e.what(), "", "invalid_json");
  }
  if (!body.is_object()) throw ApiError(400, "the request body must be a JSON object", "", "invalid_json");

  if (const json* m = field(body, "model")) {
    if (!m->is_string()) throw bad("model", "'model' must be a string", "invalid_type");
    if (m->get<std::string>() != limits.model_name)
      throw ApiError(404, "The model '" + m->get<std::string>() + "' does not exist; this server serves '" +
                              limits.model_name + "'",
                     "model", "model_not_found");
  }
  if (integer_in(body, "n", 1, 1, 1) != 1) throw bad("n", "only n = 1 is supported");
  if (boolean(body, "echo", false)) throw bad("echo", "'echo' is not supported", "unsupported");
  if (const json* lp = field(body, "logprobs"); lp && !(lp->is_boolean() && !lp->get<bool>()))
    throw bad("logprobs", "'logprobs' is not supported", "unsupported");

  ApiRequest r;
  r.chat = chat;
  r.stream = boolean(body, "stream", false);
  if (const json* so = field(body, "stream_options")) {
    if (!so->is_object()) throw bad("stream_options", "'stream_options' must be an object", "invalid_type");
    r.include_usage = boolean(*so, "include_usage", false);
  }
  r.return_token_ids = boolean(body, "return_token_ids", false);

  std::vector<int32_t>& prompt = r.serve.prompt;
  const char* prompt_param = chat ? "messages" : "prompt";
  if (chat) {
    const json* messages = field(body, "messages");
    if (!messages) throw bad("messages", "'messages' is required", "missing_field");
    prompt = tok.encode(render_chat_prompt(*messages));
  } else {
    const json* p = field(body, "prompt");
    if (!p) throw bad("prompt", "'prompt' is required", "missing_field");
    if (p->is_string()) {
      prompt = tok.encode(p->get<std::string>());
    } else if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) {
      prompt = tok.encode((*p)[0].get<std::string>());
    } else if (p->is_array() && (p->empty() || (*p)[0].is_number())) {
      prompt = token_ids(*p, "prompt", limits.n_vocab);
    } else {
      throw bad("prompt", "'prompt' must be a string, a one-string array or an array of token ids", "invalid_type");
    }
  }
  if (prompt.empty()) throw bad(prompt_param, "the prompt is empty (RWKV has no start token)");
  if (int64_t(prompt.size()) >= limits.max_context)
    throw ApiError(400,
                   "the prompt has " + std::to_string(prompt.size()) + " tokens; this server's context limit is " +
                       std::to_string(limits.max_context) + " tokens (prompt + completion)",
                   prompt_param, "context_length_exceeded");

  const char* max_key = chat && field(body, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  const int64_t requested = integer_in(body, max_key, std::min(limits.default_max_tokens, limits.max_tokens_limit), 1,
                                       limits.max_tokens_limit);
  // An RNN has no hard window: a completion that would pass the context limit is cut there instead.
  r.serve.max_tokens = std::min<int64_t>(requested, limits.max_context - int64_t(prompt.size()));

  parse_sampling(body, limits, r.serve.sampling);
  if (chat) {
    r.serve.sampling.stop_tokens.push_back(kChatStopToken);
    r.serve.sampling.stop_strings.push_back(kChatStopString);
    r.serve.feed_stop_token = kChatStopToken;
  }
  try {
    r.serve.sampling.validate(limits.n_vocab);
  } catch (const Error& e) {
    throw bad("", e.what());
  }
  r.serve.deadline = std::chrono::steady_clock::now() + limits.request_timeout;
  return r;
}

}  // namespace rwkvx
