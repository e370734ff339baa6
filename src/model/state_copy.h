// Copying one sequence's state between slots of States (the server's prefix cache, chat snapshots):
// token-shift rows, WKV state, KV caches (rows, chunk means, lengths) and the position. KV caches are
// deep-copied into fresh storage, so the copy and the original evolve independently afterwards.
#pragma once
#include <cstddef>

#include "model/state.h"

namespace rwkvx {

// dst[dst_slot] = src[src_slot]. Both States come from the same model (same tensor shapes).
void copy_state_slot(Backend& be, const State& src, int src_slot, State& dst, int dst_slot);

// Bytes of backend memory one slot of `s` holds (fixed-size tensors plus its KV-cache capacity), for
// memory budgets.
size_t state_slot_bytes(const State& s, int slot);

}  // namespace rwkvx
