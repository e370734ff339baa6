// `rwkvx generate`: continue a prompt with a model and stream the text to stdout as it is produced
// (spec system.md §2: PIPELINE sampling; §2.1 streaming). Prefill progress goes to stderr, and only
// when stderr is a terminal, so redirected output stays clean. --state-in / --state-out load and save
// the whole session (state_file.h), so a long context can be prefilled once and continued many times.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <sstream>

#include "commands.h"
#include "core/error.h"
#include "model_args.h"
#include "runtime/engine.h"
#include "runtime/session.h"
#include "runtime/tokenizer.h"
#include "sampling_args.h"

namespace rwkvx {
namespace {

struct GenerateArgs {
  ModelArgs model;
  SamplingArgs sampling;
  std::string prompt, prompt_file, prompt_tokens_file, state_in, state_out;
  bool print_tokens = false;
  int64_t prefill_chunk = 512;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open prompt file");
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_out(const std::string& s) {
  if (std::fwrite(s.data(), 1, s.size(), stdout) != s.size() || std::fflush(stdout) != 0)
    throw Error("stdout: write failed");
}

void run_generate(GenerateArgs& a) {
  const int n_prompts = !a.prompt.empty() + !a.prompt_file.empty() + !a.prompt_tokens_file.empty();
  if (n_prompts > 1) throw Error("give only one of --prompt, --prompt-file and --prompt-tokens");
  if (n_prompts == 0 && a.state_in.empty())
    throw Error("nothing to continue: give --prompt, --prompt-file or --prompt-tokens (or --state-in)");
  const bool tty = isatty(STDERR_FILENO);

  Tokenizer tok = Tokenizer::load(a.sampling.vocab.empty() ? default_vocab_path() : a.sampling.vocab);
  auto backend = make_backend(a.model.device, a.model.int8);
  LoadedModel lm = load_model(a.model.path, a.model.options, *backend);
  SamplingParams params = a.sampling.params;
  params.seed = resolve_seed(a.sampling);
  params.validate(lm.model->config().n_vocab);

  Session session(*lm.model, lm.fingerprint, &tok);
  if (!a.state_in.empty()) session.load(a.state_in);
  if (!a.prompt_tokens_file.empty()) {
    session.append(read_token_ids(a.prompt_tokens_file));
  } else if (n_prompts) {
    session.append(tok.encode(a.prompt_file.empty() ? a.prompt : read_file(a.prompt_file)));
  }

  const auto t0 = std::chrono::steady_clock::now();
  auto seconds_since = [](auto t) { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count(); };
  Session::Progress progress;
  if (tty)
    progress = [&](int64_t done, int64_t total) {
      std::fprintf(stderr, "\rprefill %lld/%lld tokens (%.0f tok/s)", (long long)done, (long long)total,
                   double(done) / std::max(1e-9, seconds_since(t0)));
      if (done == total) std::fprintf(stderr, "\n");
    };
  session.prefill(progress, a.prefill_chunk);
  if (tty) std::fprintf(stderr, "seed %llu\n", (unsigned long long)params.seed);

  const auto t1 = std::chrono::steady_clock::now();
  GenerationResult r = session.generate(params, a.sampling.max_tokens, [&](const std::string& text) {
    if (!a.print_tokens) write_out(text);
  });
  if (a.print_tokens) {
    std::string line;
    for (int32_t id : r.tokens) line += (line.empty() ? "" : " ") + std::to_string(id);
    write_out(line + "\n");
  } else if (isatty(STDOUT_FILENO)) {
    write_out("\n");
  }
  if (tty)
    std::fprintf(stderr, "[%zu tokens, %.1f tok/s, finish: %s]\n", r.tokens.size(),
                 double(r.tokens.size()) / std::max(1e-9, seconds_since(t1)), finish_reason_name(r.reason));
  if (!a.state_out.empty()) session.save(a.state_out);
}

}  // namespace
}  // namespace rwkvx

void register_generate_commands(CLI::App& app) {
  using namespace rwkvx;
  static GenerateArgs a;
  CLI::App* cmd = app.add_subcommand("generate", "continue a prompt and stream the generated text to stdout");
  add_model_args(cmd, a.model);
  add_device_arg(cmd, a.model);
  add_sampling_args(cmd, a.sampling, 256);
  cmd->add_option("--prompt,-p", a.prompt, "prompt text");
  cmd->add_option("--prompt-file", a.prompt_file, "file holding the prompt (raw bytes)");
  cmd->add_option("--prompt-tokens", a.prompt_tokens_file, "file of whitespace-separated prompt token ids");
  cmd->add_option("--state-in", a.state_in, "continue from a saved session state (prompt optional)");
  cmd->add_option("--state-out", a.state_out, "save the session state afterwards (written atomically)");
  cmd->add_flag("--print-tokens", a.print_tokens, "print the generated token ids (one line) instead of text");
  cmd->add_option("--prefill-chunk", a.prefill_chunk, "prompt tokens per forward call (memory only)")
      ->check(CLI::PositiveNumber)
      ->default_val(512);
  cmd->callback([] { run_generate(a); });
}
