// Long-context loss (spec system.md §5.2, evaluation/eval_long_loss.py) plus the per-position curve the
// spec recommends. Documents come from .txt (one document), .jsonl ({"text": ...} per line) or a binidx
// prefix (one document per item, already tokens). Each qualifying document contributes one window
// w = ids[skip : skip + n + 1] and the cross-entropy (nats) of predicting w[1..n] from its prefix.
#pragma once
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace rwkvx {

class Model;
class Tokenizer;

// Documents as token ids, in file order. `path` ending in .txt is one document; .jsonl is one document per
// non-empty line, the string field `text_field`; otherwise `path` is a binidx prefix (PREFIX.bin/.idx).
// Throws rwkvx::Error naming the file (and line number for jsonl) on any problem.
std::vector<std::vector<int32_t>> load_documents(const std::string& path, const Tokenizer* tok,
                                                 const std::string& text_field = "text");

// Cross-entropy (nats) of predicting ids[i + 1] from ids[0..i], for i = 0 .. ids.size() − 2, from a fresh
// state. Runs the sequence in windows of `window` rows (logits of one window at a time in memory; the
// state carries over, so the result equals one forward of the whole sequence).
std::vector<double> token_losses(const Model& model, const std::vector<int32_t>& ids, int64_t window = 256);

struct LongLossConfig {
  std::vector<int64_t> lengths;  // S values (bucket edges), increasing; the last one is the longest window
  int64_t skip = 2048;           // leading tokens of each document that are never scored
  int64_t max_docs = 100;        // documents per S (the first that qualify, in file order)
};

// The official S list: 2048, 4096, ... below seq_length, then seq_length.
std::vector<int64_t> long_loss_default_lengths(int64_t seq_length = 32768);

struct LongLossBucket {
  int64_t lo = 0, hi = 0;    // positions (lo, hi], 1-based: position p is the prediction of w[p]
  int64_t docs = 0;          // documents counted for S = hi (the first max_docs with len(ids) - skip >= hi)
  double mean_loss = NAN;    // official mean_loss(S = hi): mean over those documents of their mean over 1..S
  double bucket_loss = NAN;  // mean over the same documents of their mean over positions (lo, hi]
};

struct LongLossResult {
  std::vector<LongLossBucket> buckets;
  // position_loss[p - 1]: mean loss at position p over every scored document that reaches p;
  // position_docs[p - 1]: how many documents that is.
  std::vector<double> position_loss;
  std::vector<int64_t> position_docs;
  int64_t docs_read = 0;  // documents looked at (qualifying or not) before every S had max_docs
};

// Validates `cfg` (lengths positive and strictly increasing, skip >= 0, max_docs >= 1); throws rwkvx::Error.
void validate_long_loss_config(const LongLossConfig& cfg);

// Walks the documents in order. As in the official script, a document qualifies for S when
// len(ids) - skip >= S, and its window ids[skip : skip + S + 1] scores min(S, len(ids) - skip - 1)
// positions. A document is run once, over the longest S it qualifies for that still needs documents,
// and its losses serve every smaller S that still needs documents too (a causal model's loss at position
// p does not depend on later tokens, so this equals the official separate run per S). Stops when every S
// has max_docs documents. Throws rwkvx::Error if no document qualifies for the smallest S.
LongLossResult run_long_loss(const Model& model, const std::vector<std::vector<int32_t>>& docs,
                             const LongLossConfig& cfg, const std::function<void(int64_t doc, int64_t n)>& progress = {});

}  // namespace rwkvx
