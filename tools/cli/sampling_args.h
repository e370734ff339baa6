// Sampling and generation flags shared by `rwkvx generate` and `rwkvx chat` (spec system.md §2).
// The sampling top-k is --sample-top-k because --top-k already names the sparse-attention option of
// every model command.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/sampler.h"

namespace CLI {
class App;
class Option;
}

namespace rwkvx {

struct SamplingArgs {
  SamplingParams params;
  uint64_t seed = 0;
  bool seed_given = false;       // no --seed: a random seed, printed when stderr is a terminal
  int64_t max_tokens = 256;
  std::string vocab;             // "" = default_vocab_path()
};

void add_sampling_args(CLI::App* cmd, SamplingArgs& a, int64_t default_max_tokens);

// The seed to use: --seed, else one from std::random_device.
uint64_t resolve_seed(const SamplingArgs& a);

}  // namespace rwkvx
