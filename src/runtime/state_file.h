// State files: one sequence's full state (token-shift rows, WKV states, sparse-attention KV caches with
// their chunk means, position) plus its token history, with enough identity to refuse a state that
// another model or other state-shaping options (chunk size, top-k, KV eviction) produced.
//
// Layout (little-endian), version 1:
//   "RWKVXSTATE\n" (11 bytes) + u8 0 | u32 version | u64 header_len | header: JSON, header_len bytes |
//   payload | u64 Hash64 of every byte before it
// The JSON header holds the model fingerprint (engine.h) and shape (arch, vocab, width, heads, block
// counts), the options, the position, the token counts and each sparse block's cache length; the
// payload follows in a fixed order whose sizes all follow from the header: tokens (int32 ×
// n_tokens), the logits of the next position (fp32 × n_logits, 0 or n_vocab), per RWKV block att_shift [C] and wkv [H, N, N], every ffn_shift [C], then per sparse block
// k [len, C], v [len, C], chunk means [n_chunks, C] (fp32). The file must be exactly that long.
// Files are written with AtomicFile (temp, fsync, rename).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/model.h"

namespace rwkvx {

inline constexpr uint32_t kStateFileVersion = 1;

struct SessionTokens {
  std::vector<int32_t> tokens;  // the whole history
  int64_t n_pending = 0;        // the last n_pending tokens are in the history but not yet in the state
  std::vector<float> logits;    // logits of the next position when known (n_vocab values), else empty
};

// Saves slot `slot` of `state`. `fingerprint` is LoadedModel::fingerprint.
void save_state_file(const std::string& path, const Model& model, const std::string& fingerprint,
                     const State& state, int slot, const SessionTokens& tokens);

// Loads into slot `slot` of `state` (replacing it) and returns the token history. Throws rwkvx::Error
// naming `path` and the mismatch for: not a state file, another format version, truncation, trailing
// bytes, a checksum failure, another model (fingerprint or shape), other state-shaping options, or
// inconsistent sizes. On error the slot is left as it was.
SessionTokens load_state_file(const std::string& path, const Model& model, const std::string& fingerprint,
                              State& state, int slot);

}  // namespace rwkvx
