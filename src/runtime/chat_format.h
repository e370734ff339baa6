// The RWKV World chat format shared by `rwkvx chat` and the server's /v1/chat/completions:
// "User: …\n\nAssistant: …\n\n" turns, "\n\n" (token 261, spec system.md §1.4) ending each turn.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace rwkvx {

inline constexpr int32_t kChatStopToken = 261;           // "\n\n": turn separator and stop token
inline constexpr const char* kChatStopString = "User:";  // a reply that starts the next turn ends there

// A message as one turn: "\r\n" becomes "\n", runs of newlines collapse to one (a blank line would end
// the turn), leading and trailing whitespace is trimmed.
inline std::string clean_chat_message(std::string_view in) {
  std::string s;
  s.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] == '\r' && i + 1 < in.size() && in[i + 1] == '\n') continue;
    if (in[i] == '\n' && !s.empty() && s.back() == '\n') continue;
    s.push_back(in[i]);
  }
  const size_t b = s.find_first_not_of(" \t\n"), e = s.find_last_not_of(" \t\n");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

}  // namespace rwkvx
