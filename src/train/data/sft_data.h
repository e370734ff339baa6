// SFT data (spec system.md §4.9, the official sft/src/dataset.py): jsonl conversations turned into token
// ids with labels on the assistant replies only, padded or truncated to ctx_len, and the sample order
// (step³ mod p, then seeded permutations). Each line is either the official form
//   {"conversations": [{"from": "user"|"assistant", "value": "..."}, ...], "system": "..."}
// or the shorthand {"prompt": "...", "response": "..."} (one user turn and one assistant turn).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/tokenizer.h"

namespace rwkvx {

struct SftSample {
  std::vector<int32_t> ids;     // the conversation's tokens (not yet truncated or padded)
  std::vector<int32_t> labels;  // = ids on scored positions, −100 elsewhere
};

// A turn's text: strip(), then every "\n" + (whitespace + "\n")+ run collapsed to "\n" (the official regex
// \n(\s*\n)+ → \n, with ASCII whitespace).
std::string sft_clean_value(const std::string& value);

// One conversation: each turn "User: v\n\n" / "Assistant: v\n\n" (an empty value gives "User:" /
// "Assistant:" without a terminator) tokenized on its own; user turns unscored, assistant turns scored
// except their first 3 tokens ("Assistant:"). A non-empty system text is prepended to the first user value
// with "\n". `where` names the line in errors.
SftSample sft_encode(const Tokenizer& tok, const std::string& json_line, const std::string& where);

// Reads a jsonl file (blank lines skipped). Throws rwkvx::Error naming file:line for invalid JSON, a
// missing field, or an unknown speaker.
std::vector<SftSample> load_sft_jsonl(const Tokenizer& tok, const std::string& path);

// The training pair of a sample at ctx_len: x = ids truncated to ctx_len and right-padded with 0;
// targets[t] = labels[t + 1] (the loss shifts by one), −100 beyond the sample and at t = ctx_len − 1.
void sft_window(const SftSample& s, int64_t ctx_len, std::vector<int32_t>& x, std::vector<int32_t>& targets);

// The largest prime p ≡ 2 (mod 3) with p < n (0 if none), as the official SFT dataset picks it.
uint64_t sft_prime(uint64_t n);

// The sample index for global sample `step` of `n` samples: k = step³ mod p while step < p, otherwise
// entry k of the (step / p)-th permutation of 0..n−1. The official code draws those permutations with
// numpy seed 222; ours come from `seed` (portable splitmix64 Fisher–Yates).
uint64_t sft_sample_index(uint64_t step, uint64_t n, uint64_t p, uint64_t seed);

}  // namespace rwkvx
