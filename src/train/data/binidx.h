// binidx token datasets (Megatron MMapIndexedDataset version 1, spec system.md §4.1): PREFIX.bin holds
// every document's tokens concatenated, PREFIX.idx their dtype, sizes, byte offsets and document index.
// The reader maps both files and validates every header field before use; the writer streams tokens
// into PREFIX.bin and writes PREFIX.idx at the end, both atomically.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/atomic_file.h"
#include "core/mapped_file.h"

namespace rwkvx {

// Megatron dtype codes. 6 and 7 (float64) exist in the format but cannot hold token ids, so the reader
// refuses them.
enum class BinIdxDType : uint8_t { u8 = 1, i8 = 2, i16 = 3, i32 = 4, i64 = 5, f64_float = 6, f64 = 7, u16 = 8 };

// Bytes per element of a dtype code (0 if the code is unknown).
size_t binidx_itemsize(uint8_t code);
const char* binidx_dtype_name(uint8_t code);

class BinIdxDataset {
 public:
  // Maps PREFIX.idx and PREFIX.bin. Throws rwkvx::Error naming the file and the field at fault: magic,
  // version, dtype, counts against the file size, sizes, pointers (inside .bin, aligned, contiguous from
  // pointer[0] in item order), doc_idx (non-decreasing, 0 .. N), .bin size a multiple of the item size.
  static BinIdxDataset open(const std::string& prefix);

  const std::string& prefix() const { return prefix_; }
  uint8_t dtype_code() const { return dtype_; }
  size_t itemsize() const { return itemsize_; }
  uint64_t n_items() const { return sizes_.size(); }
  uint64_t n_tokens() const { return n_tokens_; }  // len(.bin) / itemsize, as the trainer counts
  const std::vector<int32_t>& sizes() const { return sizes_; }
  const std::vector<int64_t>& pointers() const { return pointers_; }
  const std::vector<int64_t>& doc_idx() const { return doc_idx_; }

  // Token at absolute position `pos` (counted in tokens from the start of .bin).
  int64_t token(uint64_t pos) const;
  // Copies tokens [start, start + n) (absolute positions) to `out` as int32. Throws rwkvx::Error if the
  // range leaves the file or a value is negative or above `max_id` (a vocab bound, for example).
  void read_tokens(uint64_t start, uint64_t n, int32_t* out, int64_t max_id = INT32_MAX) const;
  // The tokens of item k.
  std::vector<int32_t> item(uint64_t k) const;

 private:
  std::string prefix_;
  std::shared_ptr<const MappedFile> bin_;
  uint8_t dtype_ = 0;
  size_t itemsize_ = 0;
  uint64_t n_tokens_ = 0;
  std::vector<int32_t> sizes_;
  std::vector<int64_t> pointers_, doc_idx_;
};

// Streams documents into PREFIX.bin (through a temp file) and writes PREFIX.idx on finish(); nothing
// appears under the final names unless finish() succeeds. One item and one document per add_document
// call, as make_data.py writes them (doc_idx = 0, 1, ..., N).
class BinIdxWriter {
 public:
  // dtype: u16 (make_data.py's choice, ids < 65536) or i32 (larger vocabularies); others are refused.
  BinIdxWriter(const std::string& prefix, BinIdxDType dtype);
  // Throws rwkvx::Error if an id does not fit the dtype (naming the document and position) or the
  // document has more than 2^31 − 1 tokens.
  void add_document(std::span<const int32_t> ids);
  // Writes PREFIX.idx and commits both files.
  void finish();

  uint64_t n_documents() const { return sizes_.size(); }
  uint64_t n_tokens() const { return n_tokens_; }

 private:
  std::string prefix_;
  BinIdxDType dtype_;
  std::unique_ptr<AtomicFile> bin_;
  std::vector<int32_t> sizes_;
  uint64_t n_tokens_ = 0;
  std::vector<uint8_t> buf_;
  bool finished_ = false;
};

// Smallest dtype the writer uses for a vocabulary whose largest id is `max_id`: u16 up to 65535, else i32.
BinIdxDType binidx_dtype_for_vocab(int64_t max_id);

}  // namespace rwkvx
