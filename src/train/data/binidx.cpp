// binidx reader and writer (spec system.md §4.1). All fields are little-endian; like the official
// numpy code, values are read in host order (every supported host is little-endian).
#include "train/data/binidx.h"

#include <cstring>

#include "core/error.h"

namespace rwkvx {
namespace {

constexpr uint8_t kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', 0, 0};
constexpr uint64_t kHeader = 34;  // magic 9 + version 8 + dtype 1 + N 8 + D 8

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

int64_t load_token(const uint8_t* p, uint8_t code) {
  switch (code) {
    case 1: return p[0];
    case 2: return int8_t(p[0]);
    case 3: return load<int16_t>(p);
    case 4: return load<int32_t>(p);
    case 5: return load<int64_t>(p);
    case 8: return load<uint16_t>(p);
    default: return 0;
  }
}

}  // namespace

size_t binidx_itemsize(uint8_t code) {
  switch (code) {
    case 1: case 2: return 1;
    case 3: case 8: return 2;
    case 4: return 4;
    case 5: case 6: case 7: return 8;
    default: return 0;
  }
}

const char* binidx_dtype_name(uint8_t code) {
  switch (code) {
    case 1: return "uint8";
    case 2: return "int8";
    case 3: return "int16";
    case 4: return "int32";
    case 5: return "int64";
    case 6: return "float64 (np.float)";
    case 7: return "float64";
    case 8: return "uint16";
    default: return "unknown";
  }
}

BinIdxDataset BinIdxDataset::open(const std::string& prefix) {
  BinIdxDataset d;
  d.prefix_ = prefix;
  const std::string idx_path = prefix + ".idx", bin_path = prefix + ".bin";
  auto idx = MappedFile::open(idx_path);
  auto fail = [&](const std::string& field, const std::string& msg) -> void {
    throw Error(idx_path + ": field '" + field + "': " + msg);
  };
  const uint64_t n = idx->size();
  const uint8_t* p = idx->data();
  if (n < kHeader)
    throw Error(idx_path + ": " + std::to_string(n) + " bytes, too short for a binidx header (34 bytes)");
  if (std::memcmp(p, kMagic, 9) != 0)
    fail("magic", "not \"MMIDIDX\\0\\0\" (not a Megatron MMapIndexedDataset index)");
  const uint64_t version = load<uint64_t>(p + 9);
  if (version != 1) fail("version", std::to_string(version) + ", only version 1 is supported");
  d.dtype_ = p[17];
  d.itemsize_ = binidx_itemsize(d.dtype_);
  if (d.itemsize_ == 0) fail("dtype", "unknown code " + std::to_string(d.dtype_) + " (valid: 1-8)");
  if (d.dtype_ == 6 || d.dtype_ == 7)
    fail("dtype", std::string("code ") + std::to_string(d.dtype_) + " (" + binidx_dtype_name(d.dtype_) +
                      ") cannot hold token ids");
  const uint64_t N = load<uint64_t>(p + 18), D = load<uint64_t>(p + 26);
  // Bound the counts by the file size before multiplying (no overflow).
  if (N > n / 12) fail("count", std::to_string(N) + " items do not fit in a " + std::to_string(n) + "-byte index");
  if (D > n / 8) fail("doc_count", std::to_string(D) + " doc_idx entries do not fit in the index");
  const uint64_t expect = kHeader + 12 * N + 8 * D;
  if (expect != n)
    throw Error(idx_path + ": " + std::to_string(n) + " bytes, but the header's counts (" + std::to_string(N) +
                " items, " + std::to_string(D) + " doc_idx entries) need exactly " + std::to_string(expect) +
                " (truncated or corrupt index)");

  d.bin_ = MappedFile::open(bin_path);
  const uint64_t bin_size = d.bin_->size();
  if (bin_size % d.itemsize_ != 0)
    throw Error(bin_path + ": " + std::to_string(bin_size) + " bytes, not a multiple of the " +
                binidx_dtype_name(d.dtype_) + " item size " + std::to_string(d.itemsize_) + " given by " + idx_path);
  d.n_tokens_ = bin_size / d.itemsize_;

  d.sizes_.resize(N);
  d.pointers_.resize(N);
  d.doc_idx_.resize(D);
  if (N) std::memcpy(d.sizes_.data(), p + kHeader, 4 * N);
  if (N) std::memcpy(d.pointers_.data(), p + kHeader + 4 * N, 8 * N);
  if (D) std::memcpy(d.doc_idx_.data(), p + kHeader + 12 * N, 8 * D);
  uint64_t next = 0;  // byte offset where item k must start
  for (uint64_t k = 0; k < N; ++k) {
    const std::string at = "[" + std::to_string(k) + "]";
    if (d.sizes_[k] < 0) fail("sizes" + at, "negative size " + std::to_string(d.sizes_[k]));
    if (d.pointers_[k] < 0 || uint64_t(d.pointers_[k]) != next)
      fail("pointers" + at, "byte offset " + std::to_string(d.pointers_[k]) + ", expected " + std::to_string(next) +
                                " (items are stored back to back in order)");
    next += uint64_t(d.sizes_[k]) * d.itemsize_;
    if (next > bin_size)
      fail("sizes" + at, "item ends at byte " + std::to_string(next) + ", past the end of " + bin_path + " (" +
                             std::to_string(bin_size) + " bytes)");
  }
  if (next != bin_size)
    throw Error(idx_path + ": the items cover " + std::to_string(next) + " bytes but " + bin_path + " holds " +
                std::to_string(bin_size) + " (index and data do not belong together)");
  if (D == 0) fail("doc_idx", "empty (it starts with 0 and ends with the item count)");
  if (d.doc_idx_[0] != 0) fail("doc_idx[0]", std::to_string(d.doc_idx_[0]) + ", expected 0");
  for (uint64_t k = 1; k < D; ++k)
    if (d.doc_idx_[k] < d.doc_idx_[k - 1] || uint64_t(d.doc_idx_[k]) > N)
      fail("doc_idx[" + std::to_string(k) + "]",
           std::to_string(d.doc_idx_[k]) + " is not in " + std::to_string(d.doc_idx_[k - 1]) + ".." + std::to_string(N));
  if (uint64_t(d.doc_idx_[D - 1]) != N)
    fail("doc_idx[" + std::to_string(D - 1) + "]", std::to_string(d.doc_idx_[D - 1]) + ", expected the item count " +
                                                       std::to_string(N));
  return d;
}

int64_t BinIdxDataset::token(uint64_t pos) const {
  if (pos >= n_tokens_)
    throw Error(prefix_ + ".bin: token position " + std::to_string(pos) + " is past the end (" +
                std::to_string(n_tokens_) + " tokens)");
  return load_token(bin_->data() + pos * itemsize_, dtype_);
}

void BinIdxDataset::read_tokens(uint64_t start, uint64_t n, int32_t* out, int64_t max_id) const {
  if (start > n_tokens_ || n > n_tokens_ - start)
    throw Error(prefix_ + ".bin: tokens [" + std::to_string(start) + ", " + std::to_string(start + n) +
                ") are past the end (" + std::to_string(n_tokens_) + " tokens)");
  const uint8_t* p = bin_->data() + start * itemsize_;
  for (uint64_t i = 0; i < n; ++i) {
    const int64_t v = load_token(p + i * itemsize_, dtype_);
    if (v < 0 || v > max_id)
      throw Error(prefix_ + ".bin: token " + std::to_string(v) + " at position " + std::to_string(start + i) +
                  " is outside 0.." + std::to_string(max_id));
    out[i] = int32_t(v);
  }
}

std::vector<int32_t> BinIdxDataset::item(uint64_t k) const {
  if (k >= sizes_.size())
    throw Error(prefix_ + ".idx: item " + std::to_string(k) + " does not exist (" + std::to_string(sizes_.size()) +
                " items)");
  std::vector<int32_t> out(static_cast<size_t>(sizes_[k]));
  read_tokens(uint64_t(pointers_[k]) / itemsize_, out.size(), out.data());
  return out;
}

BinIdxDType binidx_dtype_for_vocab(int64_t max_id) { return max_id <= 65535 ? BinIdxDType::u16 : BinIdxDType::i32; }

BinIdxWriter::BinIdxWriter(const std::string& prefix, BinIdxDType dtype) : prefix_(prefix), dtype_(dtype) {
  if (dtype != BinIdxDType::u16 && dtype != BinIdxDType::i32)
    throw Error(prefix + ".bin: the writer stores uint16 or int32 tokens, not " +
                binidx_dtype_name(uint8_t(dtype)));
  bin_ = std::make_unique<AtomicFile>(prefix + ".bin");
}

void BinIdxWriter::add_document(std::span<const int32_t> ids) {
  RWKVX_ASSERT(!finished_, "BinIdxWriter::add_document after finish");
  if (ids.size() > size_t(INT32_MAX))
    throw Error(prefix_ + ".bin: document " + std::to_string(sizes_.size()) + " has " + std::to_string(ids.size()) +
                " tokens; binidx sizes are int32");
  const int64_t hi = dtype_ == BinIdxDType::u16 ? 65535 : INT32_MAX;
  const size_t es = binidx_itemsize(uint8_t(dtype_));
  buf_.resize(ids.size() * es);
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] > hi)
      throw Error(prefix_ + ".bin: document " + std::to_string(sizes_.size()) + ", position " + std::to_string(i) +
                  ": token id " + std::to_string(ids[i]) + " does not fit " + binidx_dtype_name(uint8_t(dtype_)));
    if (es == 2) {
      const uint16_t v = uint16_t(ids[i]);
      std::memcpy(buf_.data() + 2 * i, &v, 2);
    } else {
      std::memcpy(buf_.data() + 4 * i, &ids[i], 4);
    }
  }
  bin_->write(buf_.data(), buf_.size());
  sizes_.push_back(int32_t(ids.size()));
  n_tokens_ += ids.size();
}

void BinIdxWriter::finish() {
  RWKVX_ASSERT(!finished_, "BinIdxWriter::finish twice");
  const uint64_t N = sizes_.size(), D = N + 1;
  const size_t es = binidx_itemsize(uint8_t(dtype_));
  std::vector<uint8_t> h(kHeader + 12 * N + 8 * D);
  std::memcpy(h.data(), kMagic, 9);
  const uint64_t version = 1;
  std::memcpy(h.data() + 9, &version, 8);
  h[17] = uint8_t(dtype_);
  std::memcpy(h.data() + 18, &N, 8);
  std::memcpy(h.data() + 26, &D, 8);
  if (N) std::memcpy(h.data() + kHeader, sizes_.data(), 4 * N);
  int64_t ptr = 0;
  for (uint64_t k = 0; k < N; ++k) {
    std::memcpy(h.data() + kHeader + 4 * N + 8 * k, &ptr, 8);
    ptr += int64_t(sizes_[k]) * int64_t(es);
  }
  for (uint64_t k = 0; k < D; ++k) {
    const int64_t v = int64_t(k);
    std::memcpy(h.data() + kHeader + 12 * N + 8 * k, &v, 8);
  }
  AtomicFile idx(prefix_ + ".idx");
  idx.write(h.data(), h.size());
  // .bin first: a reader never sees a new index over old data.
  bin_->commit();
  idx.commit();
  finished_ = true;
}

}  // namespace rwkvx
