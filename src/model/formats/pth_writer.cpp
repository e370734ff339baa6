// PyTorch .pth writer: pickle of the state_dict + stored zip archive. The layout is described in
// pth_writer.h; the reader it must satisfy is pth.cpp (and torch.load with weights_only=True).
#include "model/formats/pth_writer.h"

#include <array>
#include <cstring>
#include <functional>

#include "core/atomic_file.h"
#include "core/error.h"
#include "model/formats/tensor_store.h"

namespace rwkvx {
namespace {

constexpr uint64_t kMax32 = 0xffffffffu;
constexpr uint64_t kAlign = 64;

// Pickle protocol 2 opcodes, only those a state_dict of tensors needs.
class PickleWriter {
 public:
  std::string out;
  void proto() { out += "\x80\x02"; }
  void stop() { out += '.'; }
  void mark() { out += '('; }
  void empty_dict() { out += '}'; }
  void empty_tuple() { out += ')'; }
  void setitems() { out += 'u'; }
  void tuple_from_mark() { out += 't'; }
  void reduce() { out += 'R'; }
  void binpersid() { out += 'Q'; }
  void newfalse() { out += '\x89'; }
  void global(const char* module, const char* name) {
    out += 'c';
    out += module;
    out += '\n';
    out += name;
    out += '\n';
  }
  void str(const std::string& s) {
    out += 'X';
    le(s.size(), 4);
    out += s;
  }
  void integer(int64_t v) {
    if (v >= 0 && v < 256) {
      out += 'K';
      le(uint64_t(v), 1);
    } else if (v >= 0 && v < 65536) {
      out += 'M';
      le(uint64_t(v), 2);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
      out += 'J';
      le(uint64_t(uint32_t(int32_t(v))), 4);
    } else {
      // LONG1: little-endian two's complement, as few bytes as keep the sign.
      uint8_t b[8];
      int n = 0;
      uint64_t u = uint64_t(v);
      for (int k = 0; k < 8; ++k) b[k] = uint8_t(u >> (8 * k));
      for (n = 8; n > 1; --n) {
        const uint8_t top = b[n - 1], below = b[n - 2];
        if (!((top == 0x00 && !(below & 0x80)) || (top == 0xff && (below & 0x80)))) break;
      }
      out += '\x8a';
      out += char(n);
      out.append(reinterpret_cast<const char*>(b), size_t(n));
    }
  }
  void int_tuple(const std::vector<int64_t>& v) {
    if (v.empty()) return empty_tuple();
    if (v.size() > 3) mark();
    for (int64_t x : v) integer(x);
    if (v.size() <= 3)
      out += char(0x84 + v.size());  // TUPLE1..TUPLE3
    else
      tuple_from_mark();
  }

 private:
  void le(uint64_t v, int n) {
    for (int k = 0; k < n; ++k) out += char(uint8_t(v >> (8 * k)));
  }
};

const char* storage_class(DType t) {
  switch (t) {
    case DType::f32: return "FloatStorage";
    case DType::f16: return "HalfStorage";
    case DType::bf16: return "BFloat16Storage";
    default: break;
  }
  throw Error(std::string("cannot write dtype ") + std::string(dtype_name(t)) + " to a .pth file");
}

std::string make_pickle(const std::vector<TensorData>& tensors) {
  PickleWriter p;
  p.proto();
  p.empty_dict();
  for (size_t i = 0; i < tensors.size(); ++i) {
    // SETITEMS in batches of 1000 pairs, as Python's pickler does.
    if (i % 1000 == 0) p.mark();
    const TensorData& t = tensors[i];
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    std::vector<int64_t> stride(t.shape.size());
    int64_t s = 1;
    for (size_t d = t.shape.size(); d-- > 0;) {
      stride[d] = s;
      s *= t.shape[d];
    }
    p.str(t.name);
    p.global("torch._utils", "_rebuild_tensor_v2");
    p.mark();
    p.mark();
    p.str("storage");
    p.global("torch", storage_class(t.dtype));
    p.str(std::to_string(i));
    p.str("cpu");
    p.integer(numel);
    p.tuple_from_mark();
    p.binpersid();
    p.integer(0);
    p.int_tuple(t.shape);
    p.int_tuple(stride);
    p.newfalse();
    p.global("collections", "OrderedDict");
    p.empty_tuple();
    p.reduce();
    p.tuple_from_mark();
    p.reduce();
    if (i % 1000 == 999 || i + 1 == tensors.size()) p.setitems();
  }
  p.stop();
  return std::move(p.out);
}

void check_tensor(const TensorData& t) {
  if (t.name.empty()) throw Error(".pth writer: a tensor has an empty name");
  uint64_t numel = 1;
  for (int64_t d : t.shape) {
    if (d < 0) throw Error(".pth writer: tensor '" + t.name + "': negative dimension");
    numel *= uint64_t(d);
  }
  storage_class(t.dtype);
  if (numel * dtype_size(t.dtype) != t.bytes.size())
    throw Error(".pth writer: tensor '" + t.name + "': " + std::to_string(t.bytes.size()) + " bytes for shape " +
                shape_to_string(t.shape) + " of " + std::string(dtype_name(t.dtype)));
}

struct Entry {
  std::string name;
  const uint8_t* data;
  uint64_t size;
  uint32_t crc = 0;
  uint64_t local_offset = 0;
};

class ZipWriter {
 public:
  ZipWriter(std::function<void(const void*, size_t)> sink, bool force_zip64)
      : sink_(std::move(sink)), force_(force_zip64) {}

  void add(Entry e) {
    e.crc = crc32_update(0, e.data, e.size);
    e.local_offset = pos_;
    const bool z64 = force_ || e.size >= kMax32;
    std::string extra;
    if (z64) {
      put(extra, 0x0001, 2);
      put(extra, 16, 2);
      put(extra, e.size, 8);
      put(extra, e.size, 8);
    }
    const uint64_t before_pad = pos_ + 30 + e.name.size() + extra.size() + 4;
    const uint64_t pad = (kAlign - before_pad % kAlign) % kAlign;
    put(extra, 0x4246, 2);  // "FB": torch's alignment padding field
    put(extra, pad, 2);
    extra.append(size_t(pad), 'Z');
    std::string h;
    put(h, 0x04034b50, 4);
    put(h, z64 ? 45 : 20, 2);   // version needed
    put(h, 0x0800, 2);          // flags: UTF-8 names
    put(h, 0, 2);               // method: stored
    put(h, 0, 2);               // time
    put(h, 0x21, 2);            // date: 1980-01-01
    put(h, e.crc, 4);
    put(h, z64 ? kMax32 : e.size, 4);
    put(h, z64 ? kMax32 : e.size, 4);
    put(h, e.name.size(), 2);
    put(h, extra.size(), 2);
    h += e.name;
    h += extra;
    emit(h.data(), h.size());
    emit(e.data, e.size);
    entries_.push_back(std::move(e));
  }

  void finish() {
    const uint64_t cd_offset = pos_;
    for (const Entry& e : entries_) {
      const bool z64 = force_ || e.size >= kMax32 || e.local_offset >= kMax32;
      std::string extra;
      if (z64) {
        put(extra, 0x0001, 2);
        put(extra, 24, 2);
        put(extra, e.size, 8);
        put(extra, e.size, 8);
        put(extra, e.local_offset, 8);
      }
      std::string h;
      put(h, 0x02014b50, 4);
      put(h, z64 ? 45 : 20, 2);  // version made by (MS-DOS attributes)
      put(h, z64 ? 45 : 20, 2);  // version needed
      put(h, 0x0800, 2);
      put(h, 0, 2);
      put(h, 0, 2);
      put(h, 0x21, 2);
      put(h, e.crc, 4);
      put(h, z64 ? kMax32 : e.size, 4);
      put(h, z64 ? kMax32 : e.size, 4);
      put(h, e.name.size(), 2);
      put(h, extra.size(), 2);
      put(h, 0, 2);  // comment
      put(h, 0, 2);  // disk
      put(h, 0, 2);  // internal attributes
      put(h, 0, 4);  // external attributes
      put(h, z64 ? kMax32 : e.local_offset, 4);
      h += e.name;
      h += extra;
      emit(h.data(), h.size());
    }
    const uint64_t cd_size = pos_ - cd_offset, count = entries_.size();
    const bool z64 = force_ || count >= 0xffff || cd_size >= kMax32 || cd_offset >= kMax32;
    std::string t;
    if (z64) {
      const uint64_t z64_offset = pos_;
      put(t, 0x06064b50, 4);
      put(t, 44, 8);  // size of the rest of the record
      put(t, 45, 2);
      put(t, 45, 2);
      put(t, 0, 4);
      put(t, 0, 4);
      put(t, count, 8);
      put(t, count, 8);
      put(t, cd_size, 8);
      put(t, cd_offset, 8);
      put(t, 0x07064b50, 4);  // locator
      put(t, 0, 4);
      put(t, z64_offset, 8);
      put(t, 1, 4);
    }
    put(t, 0x06054b50, 4);
    put(t, 0, 2);
    put(t, 0, 2);
    put(t, z64 ? 0xffff : count, 2);
    put(t, z64 ? 0xffff : count, 2);
    put(t, z64 ? kMax32 : cd_size, 4);
    put(t, z64 ? kMax32 : cd_offset, 4);
    put(t, 0, 2);
    emit(t.data(), t.size());
  }

 private:
  static void put(std::string& s, uint64_t v, int n) {
    for (int k = 0; k < n; ++k) s += char(uint8_t(v >> (8 * k)));
  }
  void emit(const void* p, uint64_t n) {
    sink_(p, size_t(n));
    pos_ += n;
  }
  std::function<void(const void*, size_t)> sink_;
  bool force_;
  uint64_t pos_ = 0;
  std::vector<Entry> entries_;
};

void write_pth(const std::vector<TensorData>& tensors, const PthWriteOptions& opt,
               std::function<void(const void*, size_t)> sink) {
  const std::string& top = opt.archive_name;
  if (top.empty() || top.find_first_of("/\\") != std::string::npos)
    throw Error(".pth writer: archive name '" + top + "' must be a non-empty single path component");
  for (const TensorData& t : tensors) check_tensor(t);
  const std::string pkl = make_pickle(tensors);
  static const std::string format_version = "1", alignment = "64", byteorder = "little", version = "3\n";
  auto bytes = [](const std::string& s) { return reinterpret_cast<const uint8_t*>(s.data()); };
  ZipWriter zip(std::move(sink), opt.force_zip64);
  zip.add({top + "/data.pkl", bytes(pkl), pkl.size()});
  zip.add({top + "/.format_version", bytes(format_version), format_version.size()});
  zip.add({top + "/.storage_alignment", bytes(alignment), alignment.size()});
  zip.add({top + "/byteorder", bytes(byteorder), byteorder.size()});
  for (size_t i = 0; i < tensors.size(); ++i)
    zip.add({top + "/data/" + std::to_string(i), tensors[i].bytes.data(), tensors[i].bytes.size()});
  zip.add({top + "/version", bytes(version), version.size()});
  zip.finish();
}

}  // namespace

uint32_t crc32_update(uint32_t crc, const void* data, size_t n) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  const uint8_t* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

std::vector<uint8_t> serialize_pth(const std::vector<TensorData>& tensors, const PthWriteOptions& options) {
  std::vector<uint8_t> out;
  write_pth(tensors, options, [&](const void* p, size_t n) {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    out.insert(out.end(), b, b + n);
  });
  return out;
}

void save_pth(const std::string& path, const std::vector<TensorData>& tensors, const PthWriteOptions& options) {
  // Validate before creating the temp file, so a bad tensor leaves nothing behind.
  for (const TensorData& t : tensors) check_tensor(t);
  AtomicFile f(path);
  write_pth(tensors, options, [&](const void* p, size_t n) { f.write(p, n); });
  f.commit();
}

}  // namespace rwkvx
