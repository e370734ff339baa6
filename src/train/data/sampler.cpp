// Pretraining sample selection (spec system.md §4.2).
#include "train/data/sampler.h"

#include <string>

#include "core/error.h"

namespace rwkvx {

bool is_prime(uint64_t n) {
  if (n <= 1) return false;
  if (n <= 3) return true;
  if (n % 2 == 0 || n % 3 == 0) return false;
  for (uint64_t i = 5; i <= n / i; i += 6)
    if (n % i == 0 || n % (i + 2) == 0) return false;
  return true;
}

uint64_t magic_prime(uint64_t n_tokens, uint64_t ctx_len) {
  if (ctx_len == 0 || n_tokens / ctx_len < 3) return 0;
  for (uint64_t i = n_tokens / ctx_len - 1; i > 0; --i)
    if (i % 3 == 2 && is_prime(i)) return i;
  return 0;
}

void PretrainSampling::validate(uint64_t n_tokens, const std::string& what) const {
  auto positive = [](uint64_t v, const char* name) {
    if (v == 0) throw Error(std::string("sampling: ") + name + " must be >= 1");
  };
  positive(ctx_len, "ctx_len");
  positive(epoch_steps, "epoch_steps");
  positive(micro_bsz, "micro_bsz");
  positive(world_size, "world_size");
  if (magic_prime % 3 != 2 || !is_prime(magic_prime))
    throw Error("sampling: magic_prime " + std::to_string(magic_prime) + " is not a prime ≡ 2 (mod 3)");
  // The last window starts at (p − 1) · ctx_len and reads ctx_len + 1 tokens.
  if (magic_prime > n_tokens / ctx_len || (magic_prime - 1) * ctx_len + ctx_len + 1 > n_tokens)
    throw Error("sampling: magic_prime " + std::to_string(magic_prime) + " addresses windows past the end of " +
                what + " (" + std::to_string(n_tokens) + " tokens at ctx_len " + std::to_string(ctx_len) +
                "; the largest valid one is " + std::to_string(rwkvx::magic_prime(n_tokens, ctx_len)) + ")");
}

uint64_t PretrainSampling::step(uint64_t epoch, uint64_t idx, uint64_t rank) const {
  if (rank >= world_size)
    throw Error("sampling: rank " + std::to_string(rank) + " out of range (world size " + std::to_string(world_size) + ")");
  return epoch * samples_per_epoch() + idx * world_size + rank;
}

uint64_t PretrainSampling::window_start(uint64_t step) const {
  using u128 = unsigned __int128;
  const uint64_t s = step % magic_prime;
  const uint64_t k = uint64_t(u128(uint64_t(u128(s) * s % magic_prime)) * s % magic_prime);
  return k * ctx_len;
}

TokenWindow pretrain_sample(const BinIdxDataset& data, const PretrainSampling& s, uint64_t epoch, uint64_t idx,
                            uint64_t rank, int64_t max_id) {
  s.validate(data.n_tokens(), data.prefix() + ".bin");
  TokenWindow w;
  w.step = s.step(epoch, idx, rank);
  w.start = s.window_start(w.step);
  std::vector<int32_t> tok(s.ctx_len + 1);
  data.read_tokens(w.start, tok.size(), tok.data(), max_id);
  w.x.assign(tok.begin(), tok.end() - 1);
  w.y.assign(tok.begin() + 1, tok.end());
  return w;
}

}  // namespace rwkvx
