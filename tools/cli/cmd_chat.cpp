// `rwkvx chat`: an interactive chat in the RWKV World format ("User: …\n\nAssistant: …\n\n"). The
// conversation lives in the recurrent state, so each turn prefills only the new message. Replies end
// at "\n\n" (token 261, spec system.md §1.4) or at "User:"; slash commands save, load and reset the
// conversation and change sampling settings.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <iostream>
#include <sstream>

#include "commands.h"
#include "core/error.h"
#include "model_args.h"
#include "runtime/chat_format.h"
#include "runtime/engine.h"
#include "runtime/session.h"
#include "runtime/tokenizer.h"
#include "sampling_args.h"

namespace rwkvx {
namespace {

std::atomic<bool> g_interrupted{false};
extern "C" void on_sigint(int) { g_interrupted = true; }

const char* kHelp =
    "commands:\n"
    "  /save FILE       save the conversation (state + history) to FILE\n"
    "  /load FILE       continue a conversation saved with /save\n"
    "  /reset           start a new conversation\n"
    "  /set KEY VALUE   change a setting: temperature, top_p, top_k, presence_penalty,\n"
    "                   frequency_penalty, penalty_decay, max_tokens, seed\n"
    "  /show            print the current settings\n"
    "  /help            this text\n"
    "  /quit            leave (so does end of input)\n"
    "Ctrl-C stops a reply early.\n";

void out(const std::string& s) {
  std::fwrite(s.data(), 1, s.size(), stdout);
  std::fflush(stdout);
}

class Chat {
 public:
  Chat(Session& s, const Tokenizer& tok, SamplingArgs args) : s_(s), tok_(tok), args_(std::move(args)) {
    args_.params.stop_tokens.push_back(kChatStopToken);
    args_.params.stop_strings.push_back(kChatStopString);
    seed_ = resolve_seed(args_);
  }

  // Returns false to quit.
  bool command(const std::string& line) {
    std::istringstream in(line);
    std::string cmd, arg, value;
    in >> cmd >> arg;
    std::getline(in >> std::ws, value);
    if (cmd == "/quit" || cmd == "/exit") return false;
    if (cmd == "/help") {
      out(kHelp);
    } else if (cmd == "/reset") {
      s_.reset();
      out("(new conversation)\n");
    } else if (cmd == "/save" || cmd == "/load") {
      if (arg.empty()) throw Error(cmd + " needs a file name");
      if (cmd == "/save") {
        s_.save(arg);
      } else {
        s_.load(arg);
      }
      out("(" + std::string(cmd == "/save" ? "saved " : "loaded ") + std::to_string(s_.tokens().size()) +
          " tokens " + (cmd == "/save" ? "to " : "from ") + arg + ")\n");
    } else if (cmd == "/set") {
      set(arg, value);
    } else if (cmd == "/show") {
      show();
    } else {
      throw Error("unknown command '" + cmd + "' (/help lists them)");
    }
    return true;
  }

  void turn(const std::string& message) {
    const std::string msg = clean_chat_message(message);
    if (msg.empty()) return;
    s_.append(tok_.encode("User: " + msg + "\n\nAssistant:"));
    s_.prefill();
    // A stop string ends a reply after the state has consumed its first tokens ("User"); the snapshot
    // lets that turn be rewritten as " reply\n\n" so the next prompt continues a well-formed history.
    // Other endings just append the separator.
    auto before = s_.snapshot();
    SamplingParams p = args_.params;
    p.seed = seed_ + turns_++;
    out("Assistant:");
    g_interrupted = false;
    auto old = std::signal(SIGINT, on_sigint);
    GenerationResult r;
    try {
      r = s_.generate(p, args_.max_tokens, [](const std::string& t) { out(t); }, &g_interrupted);
    } catch (...) {
      std::signal(SIGINT, old);
      throw;
    }
    std::signal(SIGINT, old);
    out("\n\n");
    if (r.reason != FinishReason::stop_string) {
      s_.append(std::span<const int32_t>(&kChatStopToken, 1));
    } else {
      s_.restore(*before);
      const std::string reply = clean_chat_message(r.text);
      s_.append(tok_.encode((reply.empty() ? std::string() : " " + reply) + "\n\n"));
    }
  }

 private:
  void set(const std::string& key, const std::string& value) {
    if (value.empty()) throw Error("/set " + key + " needs a value");
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(value, &used);
    } catch (const std::exception&) {
    }
    if (used == 0 || used != value.size()) throw Error("/set " + key + ": '" + value + "' is not a number");
    SamplingParams p = args_.params;
    if (key == "temperature") p.temperature = float(v);
    else if (key == "top_p") p.top_p = float(v);
    else if (key == "top_k") p.top_k = int(v);
    else if (key == "presence_penalty") p.presence_penalty = float(v);
    else if (key == "frequency_penalty") p.frequency_penalty = float(v);
    else if (key == "penalty_decay") p.penalty_decay = float(v);
    else if (key == "max_tokens") {
      if (v < 1) throw Error("/set max_tokens: must be >= 1");
      args_.max_tokens = int64_t(v);
    } else if (key == "seed") {
      seed_ = uint64_t(v);
      turns_ = 0;
    } else {
      throw Error("/set: unknown setting '" + key + "' (/help lists them)");
    }
    p.validate(s_.model().config().n_vocab);
    args_.params = p;
    show();
  }

  void show() {
    const SamplingParams& p = args_.params;
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "temperature %g, top_p %g, top_k %d, presence_penalty %g, frequency_penalty %g, "
                  "penalty_decay %g, max_tokens %lld, seed %llu\n",
                  p.temperature, p.top_p, p.top_k, p.presence_penalty, p.frequency_penalty, p.penalty_decay,
                  (long long)args_.max_tokens, (unsigned long long)seed_);
    out(buf);
  }

  Session& s_;
  const Tokenizer& tok_;
  SamplingArgs args_;
  uint64_t seed_ = 0;
  uint64_t turns_ = 0;
};

void run_chat(const ModelArgs& m, const SamplingArgs& sampling) {
  Tokenizer tok = Tokenizer::load(sampling.vocab.empty() ? default_vocab_path() : sampling.vocab);
  auto backend = make_backend(m.device, m.int8);
  LoadedModel lm = load_model(m.path, m.options, *backend);
  Session session(*lm.model, lm.fingerprint, &tok);
  Chat chat(session, tok, sampling);
  const bool interactive = isatty(STDIN_FILENO);
  if (interactive) out("rwkvx chat with " + m.path + " (/help for commands, /quit to leave)\n\n");
  std::string line;
  for (;;) {
    if (interactive) out("User: ");
    if (!std::getline(std::cin, line)) break;
    try {
      if (!line.empty() && line[0] == '/') {
        if (!chat.command(line)) break;
      } else {
        chat.turn(line);
      }
    } catch (const Error& e) {
      // A bad command or file must not end the conversation.
      std::fprintf(stderr, "error: %s\n", e.what());
    }
  }
}

}  // namespace
}  // namespace rwkvx

void register_chat_commands(CLI::App& app) {
  using namespace rwkvx;
  static ModelArgs m;
  static SamplingArgs s;
  CLI::App* cmd = app.add_subcommand("chat", "interactive chat (RWKV World \"User:/Assistant:\" format)");
  add_model_args(cmd, m);
  add_device_arg(cmd, m);
  add_sampling_args(cmd, s, 500);
  cmd->callback([] { run_chat(m, s); });
}
