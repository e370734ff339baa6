// Synthetic passkey-retrieval training documents (`rwkvx passkey-data`): a key hidden in filler text and
// asked for at the end, with the answer, so that a model learns to retrieve rather than to recite one
// template. A share of the documents has exactly the §5.1 evaluation form (spec system.md §5.1: the
// instruction line, the filler G, the key sentence, the question); the others vary the instruction, the
// filler (other repeated sentences, or passages of real text), the key sentence and its question, and the
// number of key digits. Lengths and depths are drawn per document. Deterministic: document i depends only
// on the options, the seed and i (splitmix64 streams), so a seed gives the same file on every platform.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace rwkvx {

struct PasskeyDataOptions {
  uint64_t docs = 1000;
  uint64_t seed = 1;
  // Filler characters per document (before and after the key together), log-uniform in [min, max].
  int64_t min_chars = 400, max_chars = 4000;
  // Key digits, uniform in [min, max]; then the key is uniform among the numbers with that many digits.
  int min_digits = 1, max_digits = 6;
  // Shares of the three document kinds: the exact §5.1 form (official instruction, G filler, key sentence
  // and question), passages of `haystack` text as filler, and the rest: repeated sentences other than G.
  double official_fraction = 0.4, haystack_fraction = 0.3;
  // Share of documents whose key sits exactly at an end of the filler (depth 0 or 1, half each), as the
  // evaluation's first and last depths put it; a uniform depth almost never does. 0 draws no extra
  // number, so the documents are those of earlier versions.
  double edge_depth_fraction = 0;
  std::vector<std::string> haystack;  // texts (UTF-8) to cut filler passages from
};

// Validates the options (ranges, fractions, haystack present when its fraction is > 0, every haystack
// text long enough for max_chars). Throws rwkvx::Error naming the option.
void validate_passkey_data(const PasskeyDataOptions& options);

struct PasskeyDocument {
  std::string text;     // prompt + " " + key + "."
  std::string kind;     // "official", "haystack" or "sentences"
  int64_t key = 0;
  int64_t filler_chars = 0, depth_chars = 0;
};

// Document `index` of the set.
PasskeyDocument passkey_document(const PasskeyDataOptions& options, uint64_t index);

// Writes documents 0 .. docs − 1 as jsonl, one {"text": ...} object per line, atomically.
void write_passkey_jsonl(const std::string& path, const PasskeyDataOptions& options);

}  // namespace rwkvx
