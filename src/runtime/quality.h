// The cost of lossy speed options (int8 weights, bf16 KV cache) measured on real text: the same tokens
// run through an exact model and a lossy one, compared logit by logit and by next-token loss.
#pragma once
#include <cstdint>
#include <vector>

#include "model/model.h"

namespace rwkvx {

struct QualityReport {
  int64_t positions = 0;         // positions compared (logits for tokens 1..n predicted from their prefix)
  double logit_rel_max_err = 0;  // max |Δlogit| / max |exact logit|
  double logit_mean_abs_err = 0; // mean |Δlogit|
  double top1_agreement = 0;     // fraction of positions where both models' argmax agree
  double loss_exact = 0;         // mean next-token cross-entropy (nats)
  double loss_lossy = 0;
};

// Runs `ids` through both models: the exact one in prefill windows, the lossy one in prefill windows
// (`decode` false) or token by token (`decode` true: the generation path, where int8 decode also
// quantizes activations). Both models must share a vocabulary. Needs at least 2 tokens.
QualityReport compare_quality(const Model& exact, const Model& lossy, const std::vector<int32_t>& ids, bool decode);

}  // namespace rwkvx
