// RWKV "World" tokenizer: strict parser for rwkv_vocab_v20230424.txt, greedy longest-match byte encoder
// (compact trie) and the three decoders (raw bytes, strict UTF-8, official compat). Implements spec §1
// (system.md §1.1 file format, §1.2 encoding, §1.3 decoding). No special-token parsing: id 0 (end of
// doc) is never produced by encode and has no bytes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace rwkvx {

// Largest id a vocab line may use: RWKV World models have 65536 embedding rows and id 0 is end-of-doc.
inline constexpr int32_t max_vocab_id = 65535;

class Tokenizer {
 public:
  // Reads and parses a vocab file. Throws rwkvx::Error naming `vocab_path` (and the line) on any problem.
  static Tokenizer load(const std::string& vocab_path);

  // Parses vocab text (spec §1.1). Lines are `<id> <python str/bytes repr> <nbytes>`; every id is in
  // 1..max_vocab_id and used once, every byte string is non-empty and distinct, and all 256 single bytes
  // must be present so that any input can be encoded. Any violation throws rwkvx::Error with a message
  // "<name_for_errors>:<line>: <what is wrong>". Never crashes, whatever the input.
  static Tokenizer parse(std::string_view text, const std::string& name_for_errors);

  // Greedy longest-prefix match over the bytes (spec §1.2). Accepts any bytes, not only UTF-8.
  // Never emits 0; empty input gives {}.
  std::vector<int32_t> encode(std::string_view bytes) const;

  // Concatenation of the tokens' bytes. Id 0 contributes nothing; any other id that is not in the vocab
  // throws rwkvx::Error naming the id and its index in `ids`.
  std::string decode_bytes(std::span<const int32_t> ids) const;

  // decode_bytes, then throws rwkvx::Error if the result is not valid UTF-8 (spec §1.3 decode_strict).
  std::string decode_strict(std::span<const int32_t> ids) const;

  // The official `decode`: the strict UTF-8 concatenation, or the single character U+FFFD ("\xEF\xBF\xBD")
  // if the bytes are invalid or incomplete UTF-8 or any id is 0 or not in the vocab. Never throws.
  std::string decode_compat(std::span<const int32_t> ids) const;

  // Max id + 1 (65530 for the World vocab; the model's embedding has 65536 rows).
  size_t vocab_size() const { return offsets_.empty() ? 1 : offsets_.size() - 1; }
  // Number of vocab entries (ids with bytes).
  size_t n_tokens() const { return n_tokens_; }
  // Length in bytes of the longest token (128 for the World vocab).
  size_t max_token_len() const { return max_token_len_; }
  // True if `id` has bytes (id 0 and unused ids do not).
  bool has_token(int32_t id) const;
  // The bytes of token `id`; "" for id 0. Throws rwkvx::Error for any other id not in the vocab.
  std::string_view token_bytes(int32_t id) const;

 private:
  // Trie node. Children of a node are consecutive nodes [first_child, first_child + n_children), sorted
  // by label; nodes with many children also get a 256-entry table in dense_ for O(1) lookup.
  struct Node {
    int32_t value = 0;         // token id ending here, 0 if none
    uint32_t first_child = 0;  // index of the first child node
    uint32_t n_children = 0;
    uint32_t dense = 0;        // 1 + slot in dense_ (slot * 256), 0 if the node uses the label scan
  };

  uint32_t child(const Node& n, uint8_t byte) const;
  void build_trie(const std::string& name, const std::vector<uint32_t>& line_of_id);

  std::string blob_;               // all token bytes, concatenated by id
  std::vector<uint32_t> offsets_;  // token id's bytes are blob_[offsets_[id], offsets_[id + 1])
  size_t n_tokens_ = 0;
  size_t max_token_len_ = 0;
  std::vector<Node> nodes_;        // nodes_[0] is the root
  std::vector<uint8_t> labels_;    // labels_[i] = byte on the edge into node i
  std::vector<uint32_t> dense_;    // child node index per byte, 0 = no child (the root is nobody's child)
};

// Strict UTF-8 check as Python's codec does it: no overlong forms, no surrogates, nothing above U+10FFFF,
// no truncated sequences.
bool is_valid_utf8(std::string_view s);

// The vocab file to use when none is given: $RWKVX_VOCAB if set, else the first existing of
// <exe dir>/../data/, <exe dir>/../share/rwkvx/ and (if compiled in) RWKVX_SOURCE_DIR/data/
// rwkv_vocab_v20230424.txt. If none exists, returns the last candidate so the error names a path.
std::string default_vocab_path();

}  // namespace rwkvx
