// State file writer and bounds-checked reader (format in state_file.h).
#include "runtime/state_file.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/mapped_file.h"
#include "runtime/hash64.h"

namespace rwkvx {
namespace {

constexpr char kMagic[12] = {'R', 'W', 'K', 'V', 'X', 'S', 'T', 'A', 'T', 'E', '\n', '\0'};
constexpr size_t kFixedHead = sizeof kMagic + 4 + 8;  // magic, version, header length
constexpr size_t kMaxHeader = 1 << 20;

const char* arch_name(ArchKind a) { return a == ArchKind::rwkvx ? "rwkvx" : "rwkv7"; }

nlohmann::json model_json(const ModelConfig& c, const std::string& fingerprint) {
  return {{"fingerprint", fingerprint}, {"arch", arch_name(c.arch)}, {"n_vocab", c.n_vocab},
          {"n_embd", c.n_embd},         {"n_head", c.n_head},        {"head_size", c.head_size},
          {"n_rwkv", c.n_rwkv},         {"n_sparse", c.n_sparse}};
}

nlohmann::json options_json(const ModelConfig& c) {
  return {{"chunk", c.sparse.chunk},
          {"top_k", c.sparse.top_k},
          {"kv_evict_max", c.eviction.max_len},
          {"kv_evict_window", c.eviction.window},
          {"kv_evict_keep", c.eviction.min_len},
          {"kv_dtype", std::string(dtype_name(c.kv_dtype))}};
}

// Writes and hashes at once, so the checksum covers exactly the bytes written.
class HashingWriter {
 public:
  explicit HashingWriter(const std::string& path) : out_(path) {}
  void write(const void* p, size_t n) {
    out_.write(p, n);
    h_.update(p, n);
  }
  void write_tensor(Backend& be, const Tensor& t) {
    buf_.resize(size_t(t.numel()));
    if (!buf_.empty()) be.to_host(t, buf_.data());
    write(buf_.data(), buf_.size() * sizeof(float));
  }
  void finish() {
    const uint64_t d = h_.digest();
    out_.write(&d, sizeof d);
    out_.commit();
  }

 private:
  AtomicFile out_;
  Hash64 h_;
  std::vector<float> buf_;
};

class HeaderReader {
 public:
  HeaderReader(const std::string& path, const nlohmann::json& j) : path_(path), j_(j) {}
  int64_t integer(const nlohmann::json& obj, const char* key, const char* where) const {
    auto it = obj.find(key);
    if (it == obj.end() || !it->is_number_integer())
      throw Error(path_ + ": corrupt state file: header field '" + where + key + "' is missing or not an integer");
    return it->get<int64_t>();
  }
  // A string field; `fallback` when absent (fields added after format version 1 was first written).
  std::string string_or(const nlohmann::json& obj, const char* key, const char* where, const char* fallback) const {
    auto it = obj.find(key);
    if (it == obj.end()) return fallback;
    if (!it->is_string()) throw Error(path_ + ": corrupt state file: header field '" + where + key + "' is not a string");
    return it->get<std::string>();
  }
  const nlohmann::json& object(const char* key) const {
    auto it = j_.find(key);
    if (it == j_.end() || !it->is_object())
      throw Error(path_ + ": corrupt state file: header field '" + key + "' is missing or not an object");
    return *it;
  }

 private:
  const std::string& path_;
  const nlohmann::json& j_;
};

std::string describe_model(const nlohmann::json& m) {
  auto get = [&](const char* k) { return m.contains(k) ? m[k].dump() : std::string("?"); };
  return "fingerprint " + get("fingerprint") + ", " + get("arch") + ", vocab " + get("n_vocab") + ", n_embd " +
         get("n_embd") + ", " + get("n_rwkv") + " RWKV + " + get("n_sparse") + " sparse blocks";
}

// The options that shape a state. Chunking and top-k matter only with sparse blocks, the eviction
// window and keep size only when eviction is on.
void check_options(const std::string& path, const ModelConfig& c, const HeaderReader& hr, const nlohmann::json& o) {
  if (c.n_sparse == 0) return;
  struct Opt {
    const char* key;
    const char* flag;
    int64_t mine;
    bool relevant;
  };
  const int64_t theirs_max = hr.integer(o, "kv_evict_max", "options.");
  const bool evicting = c.eviction.max_len > 0 || theirs_max > 0;
  const Opt opts[] = {{"chunk", "--chunk-size", c.sparse.chunk, true},
                      {"top_k", "--top-k", c.sparse.top_k, true},
                      {"kv_evict_max", "--kv-evict-max", c.eviction.max_len, true},
                      {"kv_evict_window", "--kv-evict-window", c.eviction.window, evicting},
                      {"kv_evict_keep", "--kv-evict-keep", c.eviction.min_len, evicting}};
  for (const Opt& op : opts) {
    const int64_t theirs = hr.integer(o, op.key, "options.");
    if (op.relevant && theirs != op.mine)
      throw Error(path + ": state was saved with " + op.flag + " " + std::to_string(theirs) +
                  ", but the model now runs with " + op.flag + " " + std::to_string(op.mine) +
                  "; options that shape the state must match");
  }
  const std::string theirs_kv = hr.string_or(o, "kv_dtype", "options.", "f32");
  if (theirs_kv != dtype_name(c.kv_dtype))
    throw Error(path + ": state was saved with --kv-dtype " + theirs_kv + ", but the model now runs with --kv-dtype " +
                std::string(dtype_name(c.kv_dtype)) + "; options that shape the state must match");
}

}  // namespace

void save_state_file(const std::string& path, const Model& model, const std::string& fingerprint,
                     const State& state, int slot, const SessionTokens& tokens) {
  const ModelConfig& c = model.config();
  RWKVX_ASSERT(slot >= 0 && slot < state.n_slots, "save_state_file: slot out of range");
  RWKVX_ASSERT(tokens.n_pending >= 0 && tokens.n_pending <= int64_t(tokens.tokens.size()),
               "save_state_file: bad pending count");
  RWKVX_ASSERT(tokens.logits.empty() || int64_t(tokens.logits.size()) == c.n_vocab, "save_state_file: bad logits");
  nlohmann::json kv = nlohmann::json::array();
  for (const auto& caches : state.kv) {
    const KvCache& cache = caches[size_t(slot)];
    kv.push_back({{"len", cache.len}, {"n_chunks", cache.n_chunks}});
  }
  const nlohmann::json header = {{"format", "rwkvx-state"},
                                 {"model", model_json(c, fingerprint)},
                                 {"options", options_json(c)},
                                 {"pos", state.pos[size_t(slot)]},
                                 {"n_tokens", int64_t(tokens.tokens.size())},
                                 {"n_pending", tokens.n_pending},
                                 {"n_logits", int64_t(tokens.logits.size())},
                                 {"kv", kv}};
  const std::string text = header.dump();

  Backend& be = model.backend();
  HashingWriter w(path);
  w.write(kMagic, sizeof kMagic);
  const uint32_t version = kStateFileVersion;
  const uint64_t header_len = text.size();
  w.write(&version, sizeof version);
  w.write(&header_len, sizeof header_len);
  w.write(text.data(), text.size());
  w.write(tokens.tokens.data(), tokens.tokens.size() * sizeof(int32_t));
  w.write(tokens.logits.data(), tokens.logits.size() * sizeof(float));
  for (size_t i = 0; i < state.wkv.size(); ++i) {
    w.write_tensor(be, state.att_shift[i].rows_view(slot, 1));
    w.write_tensor(be, state.wkv[i].rows_view(slot, 1));
  }
  for (const Tensor& t : state.ffn_shift) w.write_tensor(be, t.rows_view(slot, 1));
  for (const auto& caches : state.kv) {
    const KvCache& cache = caches[size_t(slot)];
    if (cache.len == 0) continue;
    w.write_tensor(be, cache.k.rows_view(0, cache.len));
    w.write_tensor(be, cache.v.rows_view(0, cache.len));
    if (cache.n_chunks) w.write_tensor(be, cache.chunk_mean.rows_view(0, cache.n_chunks));
  }
  w.finish();
}

SessionTokens load_state_file(const std::string& path, const Model& model, const std::string& fingerprint,
                              State& state, int slot) {
  const ModelConfig& c = model.config();
  RWKVX_ASSERT(slot >= 0 && slot < state.n_slots, "load_state_file: slot out of range");
  auto file = MappedFile::open(path);
  const uint8_t* data = file->data();
  const size_t size = file->size();
  if (size < sizeof kMagic || std::memcmp(data, kMagic, sizeof kMagic) != 0)
    throw Error(path + ": not an rwkvx state file (bad magic)");
  if (size < kFixedHead + 8) throw Error(path + ": truncated state file (" + std::to_string(size) + " bytes)");
  uint32_t version;
  uint64_t header_len;
  std::memcpy(&version, data + sizeof kMagic, 4);
  std::memcpy(&header_len, data + sizeof kMagic + 4, 8);
  if (version != kStateFileVersion)
    throw Error(path + ": state file format version " + std::to_string(version) + ", this build reads version " +
                std::to_string(kStateFileVersion));
  if (header_len > kMaxHeader) throw Error(path + ": corrupt state file: header length " + std::to_string(header_len));
  if (header_len > size - kFixedHead - 8)
    throw Error(path + ": truncated state file: the header needs " + std::to_string(header_len) + " bytes, " +
                std::to_string(size - kFixedHead - 8) + " remain");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(data + kFixedHead, data + kFixedHead + header_len);
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": corrupt state file: header is not valid JSON (" + e.what() + ")");
  }
  if (!header.is_object() || header.value("format", "") != "rwkvx-state")
    throw Error(path + ": corrupt state file: header has no \"format\": \"rwkvx-state\"");
  HeaderReader hr(path, header);

  // Identity first: a foreign file gets the most useful message even if it is also damaged.
  const nlohmann::json& m = hr.object("model");
  const nlohmann::json mine = model_json(c, fingerprint);
  for (const char* key : {"arch", "fingerprint", "n_vocab", "n_embd", "n_head", "head_size", "n_rwkv", "n_sparse"})
    if (!m.contains(key) || m[key] != mine[key])
      throw Error(path + ": state was saved from another model (" + describe_model(m) + "); the loaded model is " +
                  describe_model(mine));
  check_options(path, c, hr, hr.object("options"));

  const int64_t pos = hr.integer(header, "pos", "");
  const int64_t n_tokens = hr.integer(header, "n_tokens", "");
  const int64_t n_pending = hr.integer(header, "n_pending", "");
  const int64_t n_logits = hr.integer(header, "n_logits", "");
  if (n_logits != 0 && n_logits != c.n_vocab)
    throw Error(path + ": corrupt state file: n_logits " + std::to_string(n_logits) + " is neither 0 nor the vocabulary size");
  auto kv_it = header.find("kv");
  if (kv_it == header.end() || !kv_it->is_array() || int64_t(kv_it->size()) != c.n_sparse)
    throw Error(path + ": corrupt state file: header field 'kv' must list " + std::to_string(c.n_sparse) +
                " sparse-block caches");
  // Every count is bounded by the file size before it is multiplied, so the sums cannot overflow.
  const uint64_t payload_max = size - kFixedHead - header_len - 8;
  auto bounded = [&](int64_t v, const std::string& what) {
    if (v < 0 || uint64_t(v) > payload_max)
      throw Error(path + ": corrupt state file: " + what + " = " + std::to_string(v) + " is out of range");
    return uint64_t(v);
  };
  bounded(pos, "pos");
  bounded(n_tokens, "n_tokens");
  if (n_pending < 0 || n_pending > n_tokens || pos != n_tokens - n_pending)
    throw Error(path + ": corrupt state file: position " + std::to_string(pos) + " does not match " +
                std::to_string(n_tokens) + " tokens with " + std::to_string(n_pending) + " pending");
  const uint64_t C = uint64_t(c.n_embd), row = C * 4;
  uint64_t need = uint64_t(n_tokens) * 4 + uint64_t(n_logits) * 4 + uint64_t(c.n_rwkv) * (row + uint64_t(c.n_head * c.head_size * c.head_size) * 4) +
                  uint64_t(c.n_rwkv + c.n_sparse) * row;
  std::vector<std::pair<int64_t, int64_t>> kv_sizes;
  for (size_t j = 0; j < kv_it->size(); ++j) {
    const std::string where = "kv[" + std::to_string(j) + "].";
    const int64_t len = hr.integer((*kv_it)[j], "len", where.c_str());
    const int64_t n_chunks = hr.integer((*kv_it)[j], "n_chunks", where.c_str());
    bounded(len, where + "len");
    if (len > pos || n_chunks != len / c.sparse.chunk)
      throw Error(path + ": corrupt state file: cache " + std::to_string(j) + " has " + std::to_string(len) +
                  " rows and " + std::to_string(n_chunks) + " chunk means at position " + std::to_string(pos));
    if (uint64_t(len) > payload_max / row)
      throw Error(path + ": truncated state file: cache " + std::to_string(j) + " needs " + std::to_string(len) +
                  " rows, more than the file holds");
    need += (2 * uint64_t(len) + uint64_t(n_chunks)) * row;
    kv_sizes.emplace_back(len, n_chunks);
  }
  const uint64_t expected = kFixedHead + header_len + need + 8;
  if (size < expected)
    throw Error(path + ": truncated state file: " + std::to_string(size) + " bytes, expected " + std::to_string(expected));
  if (size > expected)
    throw Error(path + ": corrupt state file: " + std::to_string(size - expected) + " unexpected trailing bytes");
  Hash64 h;
  h.update(data, size - 8);
  uint64_t stored;
  std::memcpy(&stored, data + size - 8, 8);
  if (stored != h.digest()) throw Error(path + ": corrupt state file: checksum mismatch");

  // Validated: now the slot is replaced.
  Backend& be = model.backend();
  const uint8_t* p = data + kFixedHead + header_len;
  SessionTokens out;
  // Sizes were checked against the file above; empty arrays are skipped (memcpy needs real pointers).
  auto take = [&p](void* dst, size_t n) {
    if (n) std::memcpy(dst, p, n);
    p += n;
  };
  out.tokens.resize(size_t(n_tokens));
  take(out.tokens.data(), size_t(n_tokens) * 4);
  out.n_pending = n_pending;
  out.logits.resize(size_t(n_logits));
  take(out.logits.data(), size_t(n_logits) * 4);
  for (size_t i = 0; i < out.tokens.size(); ++i)
    if (out.tokens[i] < 0 || out.tokens[i] >= c.n_vocab)
      throw Error(path + ": corrupt state file: token " + std::to_string(i) + " has id " + std::to_string(out.tokens[i]));
  std::vector<float> buf;
  auto read_into = [&](Tensor dst) {
    buf.resize(size_t(dst.numel()));
    take(buf.data(), buf.size() * 4);
    if (!buf.empty()) be.from_host(buf.data(), dst);
  };
  for (size_t i = 0; i < state.wkv.size(); ++i) {
    read_into(state.att_shift[i].rows_view(slot, 1));
    read_into(state.wkv[i].rows_view(slot, 1));
  }
  for (Tensor& t : state.ffn_shift) read_into(t.rows_view(slot, 1));
  for (size_t j = 0; j < state.kv.size(); ++j) {
    KvCache cache;
    cache.dtype = c.kv_dtype;
    const auto [len, n_chunks] = kv_sizes[j];
    if (len > 0) {
      const int64_t chunk = c.sparse.chunk;
      const int64_t cap = (len + chunk - 1) / chunk * chunk;
      cache.k = be.alloc(c.kv_dtype, {cap, c.n_embd});
      cache.v = be.alloc(c.kv_dtype, {cap, c.n_embd});
      cache.chunk_mean = be.alloc(DType::f32, {cap / chunk, c.n_embd});
      read_into(cache.k.rows_view(0, len));
      read_into(cache.v.rows_view(0, len));
      read_into(cache.chunk_mean.rows_view(0, n_chunks));
      cache.len = len;
      cache.n_chunks = n_chunks;
      cache.chunk = chunk;
    }
    state.kv[j][size_t(slot)] = std::move(cache);
  }
  state.pos[size_t(slot)] = pos;
  return out;
}

}  // namespace rwkvx
