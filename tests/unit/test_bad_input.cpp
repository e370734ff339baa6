// Bad checkpoints give a clear rwkvx::Error naming the file and the tensor/field at fault, never a crash
// (spec model.md §1). Every corrupt input is built in memory (MappedFile::from_bytes) from the golden
// files' bytes or from small hand-built zip/pickle/safetensors images; nothing is written to the repo.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/mapped_file.h"
#include "model/config.h"
#include "model/model.h"
#include "model/formats/pickle.h"
#include "model/formats/tensor_store.h"
#include "support/test_util.h"

namespace rwkvx {
namespace {

using Bytes = std::vector<uint8_t>;

Bytes read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw Error(path + ": cannot open");
  Bytes b(size_t(in.tellg()));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(b.data()), std::streamsize(b.size()));
  return b;
}

const Bytes& golden(const std::string& cs, const std::string& file) {
  static std::map<std::string, Bytes> cache;
  const std::string path = test::golden_dir(cs) + "/" + file;
  auto it = cache.find(path);
  if (it == cache.end()) it = cache.emplace(path, read_bytes(path)).first;
  return it->second;
}

void put_le(Bytes& b, size_t off, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b[off + size_t(i)] = uint8_t(v >> (8 * i));
}
uint64_t get_le(const Bytes& b, size_t off, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = v << 8 | b[off + size_t(i)];
  return v;
}
void append_le(Bytes& b, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(uint8_t(v >> (8 * i)));
}
void append(Bytes& b, const std::string& s) { b.insert(b.end(), s.begin(), s.end()); }

// Runs `fn`, which must throw rwkvx::Error; returns its message. Any other exception fails the test.
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-rwkvx exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "did not throw";
  return "";
}

// The message is one line and mentions every one of `parts`.
void expect_message(const std::string& msg, std::initializer_list<std::string> parts) {
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  for (const std::string& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
}

std::string pth_error(const std::string& name, Bytes bytes) {
  return error_of([&] { parse_pth(MappedFile::from_bytes(name, std::move(bytes))); });
}
std::string st_error(const std::string& name, Bytes bytes) {
  return error_of([&] { parse_safetensors(MappedFile::from_bytes(name, std::move(bytes))); });
}
// Parses fine, but the configuration is refused.
std::string config_error(const std::string& name, Bytes bytes) {
  TensorStore store = parse_safetensors(MappedFile::from_bytes(name, std::move(bytes)));
  return error_of([&] { infer_config(store, ModelOptions{}); });
}

// ---- zip ------------------------------------------------------------------------------------------------

// A stored (uncompressed) zip: local headers + data, central directory, end record. CRC is left 0 (the
// reader does not check it).
Bytes make_zip(const std::vector<std::pair<std::string, Bytes>>& entries) {
  Bytes z, cd;
  for (const auto& [name, data] : entries) {
    const size_t local = z.size();
    append_le(z, 0x04034b50, 4);
    append_le(z, 20, 2);  // version needed
    append_le(z, 0, 2);   // flags
    append_le(z, 0, 2);   // method: stored
    append_le(z, 0, 4);   // time, date
    append_le(z, 0, 4);   // crc
    append_le(z, data.size(), 4);
    append_le(z, data.size(), 4);
    append_le(z, name.size(), 2);
    append_le(z, 0, 2);  // extra
    append(z, name);
    z.insert(z.end(), data.begin(), data.end());

    append_le(cd, 0x02014b50, 4);
    append_le(cd, 20, 2);  // made by
    append_le(cd, 20, 2);  // needed
    append_le(cd, 0, 2);   // flags
    append_le(cd, 0, 2);   // method
    append_le(cd, 0, 4);   // time, date
    append_le(cd, 0, 4);   // crc
    append_le(cd, data.size(), 4);
    append_le(cd, data.size(), 4);
    append_le(cd, name.size(), 2);
    append_le(cd, 0, 2);  // extra
    append_le(cd, 0, 2);  // comment
    append_le(cd, 0, 2);  // disk
    append_le(cd, 0, 2);  // internal attrs
    append_le(cd, 0, 4);  // external attrs
    append_le(cd, local, 4);
    append(cd, name);
  }
  const size_t cd_off = z.size();
  z.insert(z.end(), cd.begin(), cd.end());
  append_le(z, 0x06054b50, 4);
  append_le(z, 0, 4);  // disk numbers
  append_le(z, entries.size(), 2);
  append_le(z, entries.size(), 2);
  append_le(z, cd.size(), 4);
  append_le(z, cd_off, 4);
  append_le(z, 0, 2);  // comment
  return z;
}

size_t find_eocd(const Bytes& z) {
  for (size_t p = z.size() - 22 + 1; p-- > 0;)
    if (get_le(z, p, 4) == 0x06054b50) return p;
  ADD_FAILURE() << "no end record";
  return 0;
}
// Offset of the central directory entry for `name`.
size_t find_central(const Bytes& z, const std::string& name) {
  size_t eocd = find_eocd(z);
  size_t p = get_le(z, eocd + 16, 4), count = get_le(z, eocd + 10, 2);
  for (size_t i = 0; i < count; ++i) {
    size_t nl = get_le(z, p + 28, 2), xl = get_le(z, p + 30, 2), cl = get_le(z, p + 32, 2);
    if (std::string(reinterpret_cast<const char*>(&z[p + 46]), nl) == name) return p;
    p += 46 + nl + xl + cl;
  }
  ADD_FAILURE() << "no central entry " << name;
  return 0;
}

// ---- pickle ---------------------------------------------------------------------------------------------

struct Pickle {
  Bytes b{0x80, 0x02};
  Pickle& op(uint8_t o) {
    b.push_back(o);
    return *this;
  }
  Pickle& str(const std::string& s) {
    b.push_back('X');
    append_le(b, s.size(), 4);
    append(b, s);
    return *this;
  }
  Pickle& integer(int32_t v) {
    b.push_back('J');
    append_le(b, uint32_t(v), 4);
    return *this;
  }
  Pickle& global(const std::string& module, const std::string& name) {
    b.push_back('c');
    append(b, module + "\n" + name + "\n");
    return *this;
  }
  Pickle& ints(const std::vector<int64_t>& v) {  // a tuple of ints
    op('(');
    for (int64_t x : v) integer(int32_t(x));
    return op('t');
  }
  // _rebuild_tensor_v2(('storage', <cls>, key, 'cpu', numel), offset, size, stride, False, OrderedDict())
  Pickle& tensor(const std::string& cls, const std::string& key, int64_t numel, int64_t offset,
                 const std::vector<int64_t>& size, const std::vector<int64_t>& stride) {
    global("torch._utils", "_rebuild_tensor_v2").op('(');
    op('(').str("storage").global("torch", cls).str(key).str("cpu").integer(int32_t(numel)).op('t').op('Q');
    integer(int32_t(offset)).ints(size).ints(stride).op(0x89);
    global("collections", "OrderedDict").op(')').op('R');
    return op('t').op('R');
  }
};

// A one-tensor state dict {'t': tensor(...)} in a "model/" zip, with blob "model/data/0".
Bytes one_tensor_pth(const std::string& cls, int64_t numel, int64_t offset, const std::vector<int64_t>& size,
                     const std::vector<int64_t>& stride, const Bytes& blob) {
  Pickle p;
  p.op('}').op('(').str("t").tensor(cls, "0", numel, offset, size, stride).op('u').op('.');
  return make_zip({{"model/data.pkl", p.b}, {"model/data/0", blob}, {"model/byteorder", {'l', 'i', 't', 't', 'l', 'e'}}});
}

Bytes f32_blob(const std::vector<float>& v) {
  Bytes b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// ---- safetensors ----------------------------------------------------------------------------------------

struct Safetensors {
  nlohmann::json header;
  Bytes data;
  explicit Safetensors(const Bytes& file) {
    uint64_t n = get_le(file, 0, 8);
    header = nlohmann::json::parse(file.begin() + 8, file.begin() + 8 + long(n));
    data.assign(file.begin() + 8 + long(n), file.end());
  }
  Bytes bytes() const { return with_header(header.dump()); }
  Bytes with_header(const std::string& h) const {
    Bytes out;
    append_le(out, h.size(), 8);
    append(out, h);
    out.insert(out.end(), data.begin(), data.end());
    return out;
  }
};

Safetensors golden_st(const std::string& cs = "rwkvx-tiny") { return Safetensors(golden(cs, "model.safetensors")); }

// =========================================================================================================
// .pth: zip layer

TEST(BadInputPth, GoldenFileParses) {
  TensorStore s = parse_pth(MappedFile::from_bytes("good.pth", golden("rwkvx-tiny", "model.pth")));
  EXPECT_EQ(s.tensors.size(), 157u);
  EXPECT_NO_THROW(infer_config(s, ModelOptions{}));
}

TEST(BadInputPth, TruncatedAtSeveralCutPoints) {
  const Bytes& g = golden("rwkvx-tiny", "model.pth");
  for (size_t cut : {size_t(0), size_t(10), size_t(21), size_t(22), size_t(100), g.size() / 2, g.size() - 22,
                     g.size() - 21, g.size() - 1}) {
    SCOPED_TRACE("cut at " + std::to_string(cut));
    std::string msg = pth_error("trunc.pth", Bytes(g.begin(), g.begin() + long(cut)));
    expect_message(msg, {"trunc.pth", "zip"});
  }
}

TEST(BadInputPth, CentralDirectoryOutsideFile) {
  Bytes z = golden("rwkvx-tiny", "model.pth");
  size_t eocd = find_eocd(z);
  put_le(z, eocd + 16, z.size(), 4);  // directory offset past the end
  expect_message(pth_error("cdoff.pth", z), {"cdoff.pth", "central directory lies outside the file"});
}

TEST(BadInputPth, EntryCountExceedsDirectory) {
  Bytes z = golden("rwkvx-tiny", "model.pth");
  size_t eocd = find_eocd(z);
  put_le(z, eocd + 10, 0xfff0, 2);
  expect_message(pth_error("count.pth", z), {"count.pth", "entry count"});
}

TEST(BadInputPth, BadCentralDirectorySignature) {
  Bytes z = golden("rwkvx-tiny", "model.pth");
  size_t p = find_central(z, "model/data/3");
  z[p] = 'X';
  std::string msg = pth_error("cdsig.pth", z);
  expect_message(msg, {"cdsig.pth", "bad central directory signature at entry"});
}

TEST(BadInputPth, BadLocalHeaderSignature) {
  Bytes z = golden("rwkvx-tiny", "model.pth");
  size_t p = find_central(z, "model/data/1");
  z[get_le(z, p + 42, 4) + 1] = 'Q';
  expect_message(pth_error("localsig.pth", z), {"localsig.pth", "'model/data/1'", "bad local header signature"});
}

TEST(BadInputPth, LocalHeaderOffsetOutsideFile) {
  Bytes z = golden("rwkvx-tiny", "model.pth");
  size_t p = find_central(z, "model/data/2");
  put_le(z, p + 42, z.size() - 10, 4);
  expect_message(pth_error("local.pth", z), {"local.pth", "local header lies outside the file"});
}

TEST(BadInputPth, EntrySizeBeyondFile) {
  Bytes z = golden("rwkvx-tiny", "model.pth");
  size_t p = find_central(z, "model/data/0");
  put_le(z, p + 20, 0x7fffffff, 4);
  put_le(z, p + 24, 0x7fffffff, 4);
  expect_message(pth_error("size.pth", z), {"size.pth", "'model/data/0' data lies outside the file"});
}

TEST(BadInputPth, StoredSizesDisagree) {
  Bytes z = golden("rwkvx-tiny", "model.pth");
  size_t p = find_central(z, "model/data/0");
  put_le(z, p + 20, get_le(z, p + 20, 4) - 2, 4);
  expect_message(pth_error("sizes.pth", z), {"sizes.pth", "'model/data/0'", "sizes disagree"});
}

TEST(BadInputPth, CompressedEntryIsRefusedClearly) {
  Bytes z = golden("rwkvx-tiny", "model.pth");
  size_t p = find_central(z, "model/data.pkl");
  put_le(z, p + 10, 8, 2);  // deflate
  expect_message(pth_error("deflated.pth", z), {"deflated.pth", "'model/data.pkl'", "compressed (method 8)"});
}

TEST(BadInputPth, EncryptedEntryIsRefused) {
  Bytes z = golden("rwkvx-tiny", "model.pth");
  size_t p = find_central(z, "model/data/5");
  z[p + 8] |= 1;
  expect_message(pth_error("enc.pth", z), {"enc.pth", "'model/data/5'", "encrypted"});
}

TEST(BadInputPth, DuplicateEntry) {
  Bytes blob = f32_blob({1, 2});
  Pickle p;
  p.op('}').op('.');
  Bytes z = make_zip({{"model/data.pkl", p.b}, {"model/data/0", blob}, {"model/data/0", blob}});
  expect_message(pth_error("dup.pth", z), {"dup.pth", "duplicate entry 'model/data/0'"});
}

TEST(BadInputPth, NotACheckpointZip) {
  Bytes z = make_zip({{"readme.txt", {'h', 'i'}}});
  expect_message(pth_error("other.zip", z), {"other.zip", "data.pkl"});
}

TEST(BadInputPth, GarbageIsNotAZip) {
  Bytes junk(5000, 0xab);
  expect_message(pth_error("junk.pth", junk), {"junk.pth", "end-of-central-directory"});
}

// ---- .pth: pickle layer ---------------------------------------------------------------------------------

std::string pickle_error(const Bytes& pkl) {
  return pth_error("evil.pth", make_zip({{"archive/data.pkl", pkl}, {"archive/data/0", f32_blob({1, 2, 3})}}));
}

TEST(BadInputPickle, ForbiddenGlobalOsSystem) {
  Pickle p;
  p.global("os", "system").str("echo pwned").op(0x85).op('R').op('.');
  expect_message(pickle_error(p.b), {"evil.pth", "data.pkl", "forbidden global 'os.system'"});
}

TEST(BadInputPickle, ForbiddenStackGlobalBuiltinsEval) {
  Pickle p;
  p.op(0x8c).op(8);
  append(p.b, "builtins");
  p.op(0x8c).op(4);
  append(p.b, "eval");
  p.op(0x93).str("1+1").op(0x85).op('R').op('.');
  expect_message(pickle_error(p.b), {"evil.pth", "forbidden global 'builtins.eval'"});
}

TEST(BadInputPickle, ForbiddenGlobalInsideGoldenCheckpoint) {
  // Same length as "collections\nOrderedDict": the archive stays valid, the global does not.
  Bytes z = golden("rwkvx-tiny", "model.pth");
  const std::string from = "collections\nOrderedDict\n", to = "posixpath\nsubprocess_xy\n";
  ASSERT_EQ(from.size(), to.size());
  auto it = std::search(z.begin(), z.end(), from.begin(), from.end());
  ASSERT_NE(it, z.end());
  std::copy(to.begin(), to.end(), it);
  expect_message(pth_error("golden_evil.pth", z), {"golden_evil.pth", "forbidden global 'posixpath.subprocess_xy'"});
}

TEST(BadInputPickle, ForbiddenOpcodes) {
  // INST 'i', OBJ 'o', EXT1 0x82, BUILD-free attribute setting via SETSTATE-like NEWOBJ 0x81, PERSID 'P'.
  for (uint8_t op : {uint8_t('i'), uint8_t('o'), uint8_t(0x82), uint8_t(0x81), uint8_t('P')}) {
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02x", op);
    SCOPED_TRACE(hex);
    Pickle p;
    p.op('}').op(op);
    append(p.b, "os\nsystem\n");
    p.op('.');
    expect_message(pickle_error(p.b), {"evil.pth", "data.pkl", std::string("forbidden pickle opcode ") + hex, "byte 3"});
  }
}

TEST(BadInputPickle, TruncatedAndMalformed) {
  const std::vector<std::pair<Bytes, std::string>> cases = {
      {{0x80, 0x02, '}'}, "no STOP"},
      {{0x80, 0x02, 'X', 0xff, 0xff, 0xff, 0x7f, 'a'}, "truncated pickle"},
      {{0x80, 0x02, '.'}, "malformed stack"},
      {{0x80, 0x02, 'N', 'N', '.'}, "malformed stack"},
      {{0x80, 0x02, 'a', '.'}, "stack underflow"},
      {{0x80, 0x02, 'N', 't', '.'}, "MARK"},
      {{0x80, 0x02, 'h', 0x07, '.'}, "unknown memo key 7"},
      {{0x80, 0x02, 'N', 'N', 'R', '.'}, "REDUCE"},
      {{0x80, 0x02, 0x8a, 0x09, '.'}, "wider than 64 bits"},
      {{0x80, 0x02, 'c', 'o', 's'}, "truncated GLOBAL"},
  };
  for (const auto& [pkl, want] : cases) {
    SCOPED_TRACE(want);
    expect_message(pickle_error(pkl), {"evil.pth", "data.pkl", want});
    // The unpickler alone, on the raw bytes.
    std::string direct = error_of([&] {
      pickle::unpickle(std::string_view(reinterpret_cast<const char*>(pkl.data()), pkl.size()), "raw.pkl");
    });
    expect_message(direct, {"raw.pkl", want});
  }
}

TEST(BadInputPickle, RootIsNotADict) {
  Pickle p;
  p.op(']').op('.');
  expect_message(pickle_error(p.b), {"evil.pth", "does not hold a dict"});
}

TEST(BadInputPickle, ValueIsNotATensor) {
  Pickle p;
  p.op('}').str("emb.weight").integer(5).op('s').op('.');
  expect_message(pickle_error(p.b), {"evil.pth", "tensor 'emb.weight'", "not a tensor"});
}

TEST(BadInputPickle, KeyIsNotAString) {
  Pickle p;
  p.op('}').integer(1).integer(5).op('s').op('.');
  expect_message(pickle_error(p.b), {"evil.pth", "key is not a string"});
}

// ---- .pth: tensors --------------------------------------------------------------------------------------

TEST(BadInputPth, StorageBlobShorterThanTensor) {
  // Storage says 6 floats, the blob holds 2.
  Bytes z = one_tensor_pth("FloatStorage", 6, 0, {2, 3}, {3, 1}, f32_blob({1, 2}));
  expect_message(pth_error("short.pth", z), {"short.pth", "tensor 't'", "storage blob has 8 bytes, needs 24"});
}

TEST(BadInputPth, ShapeReachesBeyondStorage) {
  Bytes z = one_tensor_pth("FloatStorage", 6, 0, {3, 3}, {3, 1}, f32_blob({1, 2, 3, 4, 5, 6}));
  expect_message(pth_error("reach.pth", z), {"reach.pth", "tensor 't'", "reach element 8"});
  z = one_tensor_pth("FloatStorage", 6, 4, {2, 3}, {3, 1}, f32_blob({1, 2, 3, 4, 5, 6}));
  expect_message(pth_error("offset.pth", z), {"offset.pth", "tensor 't'"});
  z = one_tensor_pth("FloatStorage", 6, 7, {1}, {1}, f32_blob({1, 2, 3, 4, 5, 6}));
  expect_message(pth_error("offset2.pth", z), {"offset2.pth", "tensor 't'", "storage offset out of range"});
}

TEST(BadInputPth, NegativeSizeOrStride) {
  Bytes z = one_tensor_pth("FloatStorage", 6, 0, {-2, 3}, {3, 1}, f32_blob({1, 2, 3, 4, 5, 6}));
  expect_message(pth_error("neg.pth", z), {"neg.pth", "tensor 't'", "size has an out-of-range entry -2"});
  z = one_tensor_pth("FloatStorage", 6, 0, {2, 3}, {3, 1, 1}, f32_blob({1, 2, 3, 4, 5, 6}));
  expect_message(pth_error("rank.pth", z), {"rank.pth", "tensor 't'", "different ranks"});
}

TEST(BadInputPth, OverlappingStridedViewIsRefused) {
  // stride 0 over a huge size: an expanded view whose materialised copy would be 4 TB.
  Bytes z = one_tensor_pth("FloatStorage", 1, 0, {1 << 30, 1 << 10}, {0, 0}, f32_blob({1}));
  expect_message(pth_error("expand.pth", z), {"expand.pth", "tensor 't'"});
}

TEST(BadInputPth, ZeroSizeDoesNotHideHugeSizes) {
  // numel is 0, but 2^30 * 2^30 * 2^30 would overflow int64 in any later product of the sizes.
  Bytes z = one_tensor_pth("FloatStorage", 1, 0, {1 << 30, 1 << 30, 1 << 30, 0}, {1, 1, 1, 1}, f32_blob({1}));
  expect_message(pth_error("zero.pth", z), {"zero.pth", "tensor 't'", "too many elements"});
}

TEST(BadInputPth, AbsurdRankIsRefused) {
  // A strided copy costs numel x rank, so the rank is bounded (a fuzzer-sized pickle can hold ~10^6 dims).
  std::vector<int64_t> size(100000, 1), stride(100000, 1);
  size.push_back(3);
  stride.push_back(2);
  Bytes z = one_tensor_pth("FloatStorage", 6, 0, size, stride, f32_blob({1, 2, 3, 4, 5, 6}));
  expect_message(pth_error("rank.pth", z), {"rank.pth", "tensor 't'", "rank 100001 exceeds 64"});
}

TEST(BadInputPth, UnsupportedStorageClass) {
  Bytes z = one_tensor_pth("LongStorage", 3, 0, {3}, {1}, f32_blob({1, 2, 3, 4, 5, 6}));
  // The global itself is refused by the unpickler.
  expect_message(pth_error("long.pth", z), {"long.pth", "forbidden global 'torch.LongStorage'"});
}

TEST(BadInputPth, MissingStorageBlob) {
  Pickle p;
  p.op('}').op('(').str("w").tensor("FloatStorage", "7", 2, 0, {2}, {1}).op('u').op('.');
  Bytes z = make_zip({{"model/data.pkl", p.b}, {"model/data/0", f32_blob({1, 2})}});
  expect_message(pth_error("noblob.pth", z), {"noblob.pth", "tensor 'w'", "'model/data/7' missing"});
}

TEST(BadInputPth, ContiguousHandBuiltTensor) {
  Bytes z = one_tensor_pth("FloatStorage", 6, 1, {2, 2}, {2, 1}, f32_blob({0, 1, 2, 3, 4, 5}));
  TensorStore s = parse_pth(MappedFile::from_bytes("ok.pth", z));
  ASSERT_EQ(s.tensors.size(), 1u);
  const StoredTensor& t = s.get("t");
  EXPECT_EQ(t.dtype, DType::f32);
  EXPECT_EQ(t.shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(t.to_f32(), (std::vector<float>{1, 2, 3, 4}));
}

TEST(BadInputPth, NonContiguousTensorIsMaterialisedAsTranspose) {
  // {'t': _rebuild_tensor_v2(('storage', FloatStorage, '0', 'cpu', 6), 0, (2,3), (1,2), False, OrderedDict())}
  Bytes z = one_tensor_pth("FloatStorage", 6, 0, {2, 3}, {1, 2}, f32_blob({0, 1, 2, 3, 4, 5}));
  TensorStore s = parse_pth(MappedFile::from_bytes("strided.pth", z));
  const StoredTensor& t = s.get("t");
  EXPECT_EQ(t.shape, (std::vector<int64_t>{2, 3}));
  // storage viewed as [3,2] row-major, transposed: t[i][j] = storage[i + 2j]
  EXPECT_EQ(t.to_f32(), (std::vector<float>{0, 2, 4, 1, 3, 5}));
  // The copy is owned by the store, not a pointer into the file.
  EXPECT_EQ(s.owned.size(), 1u);
}

TEST(BadInputPth, NonContiguousWithOffsetAndHalfStorage) {
  // f16 storage of 8 values; offset 1, size (3,), stride (2,) -> elements 1, 3, 5.
  const uint16_t h[8] = {0x3c00, 0x4000, 0x4200, 0x4400, 0x4500, 0x4600, 0x4700, 0x4800};  // 1..8
  Bytes blob(16);
  std::memcpy(blob.data(), h, 16);
  Bytes z = one_tensor_pth("HalfStorage", 8, 1, {3}, {2}, blob);
  TensorStore s = parse_pth(MappedFile::from_bytes("half.pth", z));
  EXPECT_EQ(s.get("t").dtype, DType::f16);
  EXPECT_EQ(s.get("t").to_f32(), (std::vector<float>{2, 4, 6}));
}

// =========================================================================================================
// .safetensors

TEST(BadInputSafetensors, GoldenRoundTripParses) {
  TensorStore s = parse_safetensors(MappedFile::from_bytes("good.safetensors", golden_st().bytes()));
  EXPECT_EQ(s.tensors.size(), 157u);
  EXPECT_NO_THROW(infer_config(s, ModelOptions{}));
}

TEST(BadInputSafetensors, TooShort) {
  expect_message(st_error("tiny.safetensors", Bytes{1, 2, 3}), {"tiny.safetensors", "too short"});
  expect_message(st_error("empty.safetensors", Bytes{}), {"empty.safetensors", "too short"});
}

TEST(BadInputSafetensors, HeaderLengthBeyondFile) {
  Bytes b = golden("rwkvx-tiny", "model.safetensors");
  put_le(b, 0, b.size(), 8);
  expect_message(st_error("hlen.safetensors", b), {"hlen.safetensors", "header length", "exceeds the file"});
  put_le(b, 0, ~uint64_t(0), 8);
  expect_message(st_error("hlen2.safetensors", b), {"hlen2.safetensors", "header length"});
}

TEST(BadInputSafetensors, TruncatedFile) {
  const Bytes& g = golden("rwkvx-tiny", "model.safetensors");
  for (size_t cut : {size_t(8), size_t(100), g.size() / 2, g.size() - 1}) {
    SCOPED_TRACE(cut);
    std::string msg = st_error("cut.safetensors", Bytes(g.begin(), g.begin() + long(cut)));
    expect_message(msg, {"cut.safetensors"});
  }
  // Cut in the data section: some tensor's range is out of bounds, and is named.
  std::string msg = st_error("cut.safetensors", Bytes(g.begin(), g.end() - 1));
  expect_message(msg, {"cut.safetensors", "tensor '", "outside the data section"});
}

TEST(BadInputSafetensors, InvalidJson) {
  Safetensors st = golden_st();
  std::string h = st.header.dump();
  h[h.size() / 2] = '\x01';
  expect_message(st_error("json.safetensors", st.with_header(h)), {"json.safetensors", "not valid JSON"});
  expect_message(st_error("json2.safetensors", st.with_header("{\"a\": ")), {"json2.safetensors", "not valid JSON"});
  expect_message(st_error("arr.safetensors", st.with_header("[1, 2]")), {"arr.safetensors", "not a JSON object"});
}

TEST(BadInputSafetensors, OffsetsOutOfRange) {
  Safetensors st = golden_st();
  const uint64_t n = st.data.size();
  st.header["rwkv.head.weight"]["data_offsets"] = nlohmann::json::array({n - 10, n + 76790});
  expect_message(st_error("range.safetensors", st.bytes()),
                 {"range.safetensors", "tensor 'rwkv.head.weight'", "outside the data section"});
  st.header["rwkv.head.weight"]["data_offsets"] = nlohmann::json::array({100, 50});
  expect_message(st_error("range2.safetensors", st.bytes()), {"range2.safetensors", "tensor 'rwkv.head.weight'"});
  st.header["rwkv.head.weight"]["data_offsets"] = nlohmann::json::array({-4, 100});
  expect_message(st_error("range3.safetensors", st.bytes()),
                 {"range3.safetensors", "tensor 'rwkv.head.weight'", "data_offsets"});
  st.header["rwkv.head.weight"]["data_offsets"] = nlohmann::json::array({0});
  expect_message(st_error("range4.safetensors", st.bytes()),
                 {"range4.safetensors", "tensor 'rwkv.head.weight'", "data_offsets"});
}

TEST(BadInputSafetensors, OverlappingTensors) {
  Safetensors st = golden_st();
  auto w = st.header["rwkv.blocks.0.ln1.weight"]["data_offsets"];
  uint64_t b = w[0].get<uint64_t>() + 2;
  st.header["rwkv.blocks.0.ln1.bias"]["data_offsets"] = nlohmann::json::array({b, b + 256});
  expect_message(st_error("overlap.safetensors", st.bytes()),
                 {"overlap.safetensors", "'rwkv.blocks.0.ln1.weight'", "'rwkv.blocks.0.ln1.bias'", "overlap"});
}

TEST(BadInputSafetensors, ByteRangeDoesNotMatchShape) {
  Safetensors st = golden_st();
  st.header["rwkv.blocks.2.att.r_k"]["shape"] = nlohmann::json::array({2, 63});
  expect_message(st_error("shape.safetensors", st.bytes()),
                 {"shape.safetensors", "tensor 'rwkv.blocks.2.att.r_k'", "does not match shape [2, 63]"});
}

TEST(BadInputSafetensors, WrongDtype) {
  Safetensors st = golden_st();
  st.header["rwkv.ln_out.bias"]["dtype"] = "F32";  // bf16 bytes: half the size F32 needs
  expect_message(st_error("dtype.safetensors", st.bytes()),
                 {"dtype.safetensors", "tensor 'rwkv.ln_out.bias'", "of f32 (512 bytes)"});
}

TEST(BadInputSafetensors, UnsupportedDtype) {
  Safetensors st = golden_st();
  st.header["rwkv.ln_out.bias"]["dtype"] = "I64";
  expect_message(st_error("i64.safetensors", st.bytes()),
                 {"i64.safetensors", "tensor 'rwkv.ln_out.bias'", "unsupported dtype 'I64'"});
  st.header["rwkv.ln_out.bias"]["dtype"] = 5;
  expect_message(st_error("i64.safetensors", st.bytes()), {"tensor 'rwkv.ln_out.bias'", "'dtype'"});
  st.header["rwkv.ln_out.bias"].erase("dtype");
  expect_message(st_error("i64.safetensors", st.bytes()), {"tensor 'rwkv.ln_out.bias'", "'dtype'"});
}

TEST(BadInputSafetensors, BadShapeEntries) {
  Safetensors st = golden_st();
  st.header["rwkv.ln_out.bias"]["shape"] = nlohmann::json::array({-1, 128});
  expect_message(st_error("neg.safetensors", st.bytes()),
                 {"neg.safetensors", "tensor 'rwkv.ln_out.bias'", "shape entry -1"});
  st.header["rwkv.ln_out.bias"]["shape"] = nlohmann::json::array({1.5});
  expect_message(st_error("neg.safetensors", st.bytes()), {"tensor 'rwkv.ln_out.bias'", "shape entry 1.5"});
  st.header["rwkv.ln_out.bias"]["shape"] = "128";
  expect_message(st_error("neg.safetensors", st.bytes()), {"tensor 'rwkv.ln_out.bias'", "'shape'"});
  st.header["rwkv.ln_out.bias"]["shape"] = nlohmann::json::array({uint64_t(1) << 32, uint64_t(1) << 32});
  expect_message(st_error("neg.safetensors", st.bytes()), {"tensor 'rwkv.ln_out.bias'", "shape too large"});
  // A zero dimension must not let an absurd one through (it would wrap to a negative int64).
  // With an empty byte range the size check cannot catch it.
  st.header["rwkv.ln_out.bias"]["shape"] = nlohmann::json::array({0, ~uint64_t(0)});
  st.header["rwkv.ln_out.bias"]["data_offsets"] = nlohmann::json::array({0, 0});
  expect_message(st_error("neg.safetensors", st.bytes()), {"tensor 'rwkv.ln_out.bias'", "shape"});
}

TEST(BadInputSafetensors, DeeplyNestedJsonDoesNotOverflowTheStack) {
  const size_t depth = 1000000;
  std::string nested = std::string(depth, '[') + std::string(depth, ']');
  Safetensors st = golden_st();
  // Inside a shape: refused with a short message (the entry is not printed in full).
  std::string h = "{\"t\":{\"dtype\":\"F32\",\"shape\":[" + nested + "],\"data_offsets\":[0,0]}}";
  std::string msg = st_error("deep.safetensors", st.with_header(h));
  expect_message(msg, {"deep.safetensors", "tensor 't'", "shape entry"});
  EXPECT_LT(msg.size(), 300u);
  // Inside __metadata__ (ignored): the header parses and is destroyed without recursion.
  h = "{\"__metadata__\":" + nested + ",\"t\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}";
  TensorStore s = parse_safetensors(MappedFile::from_bytes("deep.safetensors", st.with_header(h)));
  EXPECT_EQ(s.tensors.size(), 1u);
}

TEST(BadInputSafetensors, EntryNotAnObject) {
  Safetensors st = golden_st();
  st.header["rwkv.ln_out.bias"] = 7;
  expect_message(st_error("obj.safetensors", st.bytes()), {"obj.safetensors", "tensor 'rwkv.ln_out.bias'", "not an object"});
}

// =========================================================================================================
// Configuration inferred from names and shapes

TEST(BadInputConfig, MissingTensor) {
  Safetensors st = golden_st();
  st.header.erase("rwkv.blocks.1.att.r_k");
  expect_message(config_error("missing.safetensors", st.bytes()),
                 {"missing.safetensors", "missing tensor 'rwkv.blocks.1.att.r_k'"});
  Safetensors st2 = golden_st();
  st2.header.erase("rwkv.emb.weight");
  expect_message(config_error("noemb.safetensors", st2.bytes()), {"noemb.safetensors", "'rwkv.emb.weight'"});
}

TEST(BadInputConfig, ShapeMismatch) {
  Safetensors st = golden_st();
  auto& rk = st.header["rwkv.blocks.1.att.r_k"];
  uint64_t b = rk["data_offsets"][0].get<uint64_t>();
  rk["shape"] = nlohmann::json::array({2, 32});
  rk["data_offsets"] = nlohmann::json::array({b, b + 2 * 32 * 2});
  expect_message(config_error("shape.safetensors", st.bytes()),
                 {"shape.safetensors", "tensor 'rwkv.blocks.1.att.r_k'", "shape [2, 32], expected [2, 64]"});
}

TEST(BadInputConfig, HeadsDoNotMatchEmbedding) {
  Safetensors st = golden_st();
  auto& rk = st.header["rwkv.blocks.0.att.r_k"];
  // 4 x 32 = 128 = n_embd is a consistent head layout for block 0, so block 1's [2, 64] is the mismatch.
  rk["shape"] = nlohmann::json::array({4, 32});
  expect_message(config_error("heads.safetensors", st.bytes()),
                 {"heads.safetensors", "tensor 'rwkv.blocks.1.att.r_k'", "shape [2, 64], expected [4, 32]"});
  // 2 x 32 heads do not cover n_embd = 128.
  uint64_t b = rk["data_offsets"][0].get<uint64_t>();
  rk["shape"] = nlohmann::json::array({2, 32});
  rk["data_offsets"] = nlohmann::json::array({b, b + 2 * 32 * 2});
  expect_message(config_error("heads.safetensors", st.bytes()),
                 {"heads.safetensors", "tensor 'rwkv.blocks.0.att.r_k'", "heads x head_size = 64, but n_embd = 128"});
}

TEST(BadInputConfig, UnexpectedExtraTensor) {
  Safetensors st = golden_st();
  const uint64_t n = st.data.size();
  st.data.resize(n + 8, 0);
  st.header["rwkv.blocks.0.att.extra"] = {
      {"dtype", "F32"}, {"shape", nlohmann::json::array({2})}, {"data_offsets", nlohmann::json::array({n, n + 8})}};
  expect_message(config_error("extra.safetensors", st.bytes()),
                 {"extra.safetensors", "unexpected tensor 'rwkv.blocks.0.att.extra'"});
}

TEST(BadInputConfig, RwkvBlocksNotDivisibleBySparseBlocks) {
  // Drop RWKV block 3: 3 RWKV blocks, 2 sparse blocks.
  Safetensors st = golden_st();
  for (auto it = st.header.begin(); it != st.header.end();)
    it = it.key().starts_with("rwkv.blocks.3.") ? st.header.erase(it) : std::next(it);
  expect_message(config_error("groups.safetensors", st.bytes()), {"groups.safetensors", "silently", "3 RWKV blocks"});
}

TEST(BadInputConfig, ThreeSparseBlocksForFourRwkvBlocks) {
  // Rename moba.1.* to moba.2.* and add a moba.1 copy pointing at fresh bytes: 4 RWKV vs 3 sparse blocks.
  Safetensors st = golden_st();
  nlohmann::json extra = nlohmann::json::object();
  for (auto it = st.header.begin(); it != st.header.end();) {
    if (!it.key().starts_with("moba.1.")) {
      ++it;
      continue;
    }
    std::string rest = it.key().substr(7);
    nlohmann::json v = it.value();
    extra["moba.2." + rest] = v;
    uint64_t b = v["data_offsets"][0].get<uint64_t>(), e = v["data_offsets"][1].get<uint64_t>();
    uint64_t nb = st.data.size();
    const Bytes copy(st.data.begin() + long(b), st.data.begin() + long(e));
    st.data.insert(st.data.end(), copy.begin(), copy.end());
    v["data_offsets"] = nlohmann::json::array({nb, nb + (e - b)});
    extra["moba.1." + rest] = v;
    it = st.header.erase(it);
  }
  for (auto& [k, v] : extra.items()) st.header[k] = v;
  expect_message(config_error("moba3.safetensors", st.bytes()),
                 {"moba3.safetensors", "4 RWKV blocks", "3 sparse-attention groups", "silently"});
}

TEST(BadInputConfig, MissingBlockInTheMiddle) {
  Safetensors st = golden_st();
  for (auto it = st.header.begin(); it != st.header.end();)
    it = it.key().starts_with("rwkv.blocks.2.") ? st.header.erase(it) : std::next(it);
  expect_message(config_error("gap.safetensors", st.bytes()), {"gap.safetensors", "'rwkv.blocks.2'", "missing"});
}

TEST(BadInputConfig, MalformedBlockIndex) {
  Safetensors st = golden_st();
  st.header["rwkv.blocks.01.att.r_k"] = st.header["rwkv.blocks.1.att.r_k"];
  st.header.erase("rwkv.blocks.1.att.r_k");
  expect_message(config_error("idx.safetensors", st.bytes()),
                 {"idx.safetensors", "tensor 'rwkv.blocks.01.att.r_k'", "malformed block index"});
}

TEST(BadInputConfig, SparseBlocksWithoutRwkvPrefix) {
  // Plain RWKV-7 names plus a moba block.
  Safetensors st = golden_st("rwkv7-tiny");
  const uint64_t n = st.data.size();
  st.data.resize(n + 512, 0);
  st.header["moba.0.ln1.weight"] = {
      {"dtype", "F32"}, {"shape", nlohmann::json::array({128})}, {"data_offsets", nlohmann::json::array({n, n + 512})}};
  expect_message(config_error("mixed.safetensors", st.bytes()), {"mixed.safetensors", "moba"});
}

// =========================================================================================================
// Token ids at the model

TEST(BadInputModel, TokenIdOutsideVocabularyThrowsAndKeepsState) {
  auto be = make_reference_backend();
  TensorStore store = parse_safetensors(MappedFile::from_bytes("m.safetensors", golden_st().bytes()));
  ModelOptions opt;
  opt.chunk = 16;
  auto model = Model::from_store(store, opt, *be);
  State state = model->new_state();
  const int32_t bad[3] = {1, 300, 2};
  expect_message(error_of([&] { model->forward(bad, SeqBatch::single(3), state, LogitsMode::all); }),
                 {"token id 300", "position 1", "[0, 300)"});
  const int32_t neg[1] = {-1};
  expect_message(error_of([&] { model->forward(neg, SeqBatch::single(1), state, LogitsMode::all); }),
                 {"token id -1", "position 0"});
  // The state was left as it was: a good run afterwards matches one on a fresh state.
  const int32_t good[2] = {5, 7};
  std::vector<float> a(600), b(600);
  Tensor la = model->forward(good, SeqBatch::single(2), state, LogitsMode::all);
  be->to_host(la, a.data());
  State fresh = model->new_state();
  Tensor lb = model->forward(good, SeqBatch::single(2), fresh, LogitsMode::all);
  be->to_host(lb, b.data());
  EXPECT_EQ(a, b);
}

}  // namespace
}  // namespace rwkvx
