// The OpenAI-compatible request side of the server: JSON bodies of POST /v1/completions and
// /v1/chat/completions validated field by field into a ServeRequest, the RWKV World chat template, and
// the OpenAI error object. Every problem is an ApiError carrying the HTTP status and the OpenAI error
// fields, so the HTTP layer answers it and goes on serving.
#pragma once
#include <chrono>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

#include "runtime/chat_format.h"
#include "server/scheduler.h"

namespace rwkvx {

class Tokenizer;

struct ApiError : std::runtime_error {
  ApiError(int status, std::string message, std::string param = {}, std::string code = {},
           std::string type = "invalid_request_error")
      : std::runtime_error(message), status(status), type(std::move(type)), param(std::move(param)),
        code(std::move(code)) {}
  int status;
  std::string type, param, code;
};

// {"error": {"message", "type", "param", "code"}} (param and code are null when empty).
nlohmann::json error_body(const std::string& message, const std::string& type, const std::string& param,
                          const std::string& code);

struct ApiLimits {
  std::string model_name;            // the one model this server serves
  int64_t n_vocab = 0;
  int64_t max_tokens_limit = 4096;   // largest max_tokens a request may ask for
  int64_t default_max_tokens = 256;  // when a request gives none (clamped to the limit)
  int64_t max_context = 32768;       // prompt + completion tokens
  std::chrono::milliseconds request_timeout{600000};
};

struct ApiRequest {
  bool chat = false;
  bool stream = false;
  bool include_usage = false;     // stream_options.include_usage: a final chunk with usage
  bool return_token_ids = false;  // non-standard: token ids in the response
  ServeRequest serve;
};

// Parses and validates a request body. `chat` selects the chat-completions schema (messages) over the
// completions one (prompt). Throws ApiError (400 bad JSON / types / values / overlong prompt, 404
// unknown model).
ApiRequest parse_api_request(const std::string& body, bool chat, const Tokenizer& tok, const ApiLimits& limits);

// The RWKV World chat format: "System: …\n\nUser: …\n\nAssistant: …\n\n" per message (blank lines
// inside a message collapsed, since "\n\n" ends a turn), then "Assistant:" for the reply.
std::string render_chat_prompt(const nlohmann::json& messages);

}  // namespace rwkvx
