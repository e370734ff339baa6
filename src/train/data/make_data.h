// jsonl / plain text → binidx with the World tokenizer (spec system.md §4.1 "jsonl → binidx", the
// official pretrain/make_data.py): every document is encoded, followed by the end-of-document token 0,
// and stored as one item and one document. Used by `rwkvx data`.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "runtime/tokenizer.h"
#include "train/data/binidx.h"

namespace rwkvx {

// How a plain-text file is cut into documents.
enum class TextSplit {
  file,   // the whole file is one document (a book, an article)
  line,   // every line that is not blank is one document (without its line break)
  blank,  // paragraphs separated by blank lines; a document's lines are joined with "\n"
};

struct MakeDataOptions {
  std::vector<std::string> inputs;  // .jsonl (also .json, .ndjson) or .txt, read in order
  std::string format = "auto";      // auto (by extension) | jsonl | text
  std::string out_prefix;           // writes <out_prefix>.bin and <out_prefix>.idx
  std::string text_field = "text";  // jsonl: the string field holding a document
  TextSplit text_split = TextSplit::file;
  // make_data.py repeats the data N_EPOCH times, each copy shuffled. Without shuffle the copies keep
  // input order (and documents are streamed, not held in memory).
  uint64_t epochs = 1;
  bool shuffle = false;
  uint64_t seed = 1;                // shuffle seed (our own portable generator; Python's order cannot be reproduced)
  // Window-aligned packing (not in make_data.py; 0 = off): a document of at most `align` tokens (its
  // end-of-document 0 included) that would cross a multiple of `align` tokens is preceded by 0s up to that
  // multiple, so every pretraining window of ctx_len = align (they start at multiples of ctx_len, §4.2)
  // holds such documents whole. Longer documents are written as they come.
  uint64_t align = 0;
};

struct MakeDataStats {
  uint64_t documents = 0, tokens = 0;  // tokens include the end-of-document 0s (and the padding)
  uint64_t padding = 0;                // 0s added by `align`
  uint64_t input_bytes = 0;            // text bytes encoded so far
  double seconds = 0;
  BinIdxDType dtype = BinIdxDType::u16;
};

// Parses "file" | "line" | "blank"; throws rwkvx::Error listing them.
TextSplit parse_text_split(const std::string& name);

// Converts and writes atomically. `progress` (optional) is called every few thousand documents and at the
// end. Throws rwkvx::Error naming the file and line for unreadable input, invalid JSON, a missing or
// non-string text field, or text that is not UTF-8; nothing is written then.
MakeDataStats make_binidx(const Tokenizer& tokenizer, const MakeDataOptions& options,
                          const std::function<void(const MakeDataStats&)>& progress = {});

}  // namespace rwkvx
