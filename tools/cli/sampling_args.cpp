// Sampling flags of the CLI (see sampling_args.h). Defaults are PIPELINE_ARGS' (spec §2).
#include "sampling_args.h"

#include <CLI/CLI.hpp>
#include <random>

namespace rwkvx {

void add_sampling_args(CLI::App* cmd, SamplingArgs& a, int64_t default_max_tokens) {
  SamplingParams& p = a.params;
  cmd->add_option("--max-tokens", a.max_tokens, "most tokens to generate")
      ->check(CLI::NonNegativeNumber)
      ->default_val(default_max_tokens);
  cmd->add_option("--temperature", p.temperature, "sampling temperature; 0 = greedy")->default_val(1.0);
  cmd->add_option("--top-p", p.top_p, "nucleus sampling mass in [0, 1]; 1 = off")->default_val(0.85);
  cmd->add_option("--sample-top-k", p.top_k, "sample among the K most likely tokens; 0 = off")->default_val(0);
  cmd->add_option("--presence-penalty", p.presence_penalty, "subtracted from the logit of every token seen")
      ->default_val(0.2);
  cmd->add_option("--frequency-penalty", p.frequency_penalty, "subtracted per (decayed) occurrence")
      ->default_val(0.2);
  cmd->add_option("--penalty-decay", p.penalty_decay, "occurrence counts are multiplied by this per token")
      ->default_val(0.996);
  cmd->add_option("--ban", p.ban_tokens, "token ids that are never sampled")->delimiter(',');
  cmd->add_option("--stop-token", p.stop_tokens, "token ids that end generation (not printed)")->delimiter(',');
  cmd->add_option("--stop", p.stop_strings, "strings that end generation (not printed)");
  cmd->add_option("--seed", a.seed, "random seed (default: random)")->each([&a](const std::string&) {
    a.seed_given = true;
  });
  cmd->add_flag("--compat-top-p", p.compat_top_p,
                "reproduce the official top_p = 1.0 float32 quirk instead of treating it as off");
  cmd->add_option("--vocab", a.vocab, "vocabulary file (default: $RWKVX_VOCAB or the bundled World vocab)");
}

uint64_t resolve_seed(const SamplingArgs& a) {
  if (a.seed_given) return a.seed;
  std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

}  // namespace rwkvx
