// Pretraining sample selection and packing (spec system.md §4.2, the official `MyDataset`): sample `step`
// reads the aligned window of ctx_len + 1 tokens starting at ((step³) mod p) · ctx_len, where p, the
// "magic prime", is the largest prime ≡ 2 (mod 3) below the number of windows, so cubing visits every
// window once per p samples. Documents are simply concatenated (separated by token 0 in the data); there
// is no masking and no state reset at their boundaries.
#pragma once
#include <cstdint>
#include <vector>

#include "train/data/binidx.h"

namespace rwkvx {

// The largest prime p with p % 3 == 2 and p <= floor(n_tokens / ctx_len) − 1, as make_data.py prints it;
// 0 when there is none (make_data.py prints none below 3 · ctx_len tokens; this also returns 0 then).
uint64_t magic_prime(uint64_t n_tokens, uint64_t ctx_len);
bool is_prime(uint64_t n);

struct PretrainSampling {
  uint64_t ctx_len = 0;
  uint64_t magic_prime = 0;
  uint64_t epoch_steps = 1000;  // optimizer steps per mini-epoch
  uint64_t micro_bsz = 1;       // samples per GPU per step
  uint64_t world_size = 1;      // num_nodes · devices

  // Throws rwkvx::Error unless every field is positive, magic_prime is a prime ≡ 2 (mod 3) and the
  // windows it addresses fit in a dataset of `n_tokens` tokens (named `what` in the message).
  void validate(uint64_t n_tokens, const std::string& what) const;
  // Samples per mini-epoch over all ranks: epoch_steps · world_size · micro_bsz.
  uint64_t samples_per_epoch() const { return epoch_steps * world_size * micro_bsz; }
  // step = epoch · samples_per_epoch + idx · world_size + rank. `idx` is the DataLoader index on that
  // rank (0 .. epoch_steps · micro_bsz − 1; a batch is micro_bsz consecutive indices).
  uint64_t step(uint64_t epoch, uint64_t idx, uint64_t rank) const;
  // First token of the window of `step`: ((step mod p)³ mod p) · ctx_len, in 128-bit arithmetic.
  uint64_t window_start(uint64_t step) const;
};

struct TokenWindow {
  uint64_t step = 0, start = 0;
  std::vector<int32_t> x, y;  // x = tok[0:ctx_len], y = tok[1:ctx_len + 1]
};

// The sample for DataLoader index `idx` of mini-epoch `epoch` on `rank`. Token ids above `max_id` (for
// example the model's vocab − 1) are an error naming the dataset and position.
TokenWindow pretrain_sample(const BinIdxDataset& data, const PretrainSampling& s, uint64_t epoch, uint64_t idx,
                            uint64_t rank, int64_t max_id = INT32_MAX);

}  // namespace rwkvx
