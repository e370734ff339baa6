// PyTorch .pth reader (spec model.md §1.1): zip archive + restricted unpickler; tensors point into the
// memory-mapped storage blobs.
#include <cstring>

#include "core/error.h"
#include "model/formats/pickle.h"
#include "model/formats/tensor_store.h"
#include "model/formats/zip_reader.h"

namespace rwkvx {
namespace {

using pickle::Value;
using pickle::ValuePtr;

constexpr int64_t kMaxElems = int64_t(1) << 40;

struct PthContext {
  const MappedFile& file;
  std::map<std::string, ZipEntry> entries;
  std::string top;  // "<top>/" prefix of data.pkl

  [[noreturn]] void fail(const std::string& tensor, const std::string& msg) const {
    throw Error(file.path() + ": tensor '" + tensor + "': " + msg);
  }
};

int64_t as_int(const PthContext& c, const std::string& t, ValuePtr v, const char* what) {
  if (v->kind != Value::Kind::integer) c.fail(t, std::string(what) + " is not an integer");
  return v->i;
}

std::vector<int64_t> as_int_tuple(const PthContext& c, const std::string& t, ValuePtr v, const char* what) {
  if (v->kind != Value::Kind::tuple) c.fail(t, std::string(what) + " is not a tuple");
  std::vector<int64_t> out;
  for (ValuePtr x : v->items) {
    int64_t i = as_int(c, t, x, what);
    if (i < 0 || i > kMaxElems) c.fail(t, std::string(what) + " has an out-of-range entry " + std::to_string(i));
    out.push_back(i);
  }
  return out;
}

void add_tensor(TensorStore& store, const PthContext& c, const std::string& name, ValuePtr v) {
  if (v->kind == Value::Kind::call && v->items[0]->global == pickle::Global::rebuild_parameter) {
    ValuePtr args = v->items[1];
    if (args->items.empty()) c.fail(name, "_rebuild_parameter without arguments");
    v = args->items[0];
  }
  if (v->kind != Value::Kind::call || v->items[0]->global != pickle::Global::rebuild_tensor_v2)
    c.fail(name, "value is not a tensor (_rebuild_tensor_v2 call)");
  const auto& args = v->items[1]->items;
  if (args.size() < 4) c.fail(name, "_rebuild_tensor_v2 with " + std::to_string(args.size()) + " arguments");
  ValuePtr pid = args[0];
  if (pid->kind != Value::Kind::persistent_id || pid->pid->kind != Value::Kind::tuple || pid->pid->items.size() != 5)
    c.fail(name, "storage is not a ('storage', class, key, location, numel) persistent id");
  const auto& p = pid->pid->items;
  if (p[0]->kind != Value::Kind::string || p[0]->s != "storage") c.fail(name, "persistent id is not a storage");
  if (p[1]->kind != Value::Kind::global) c.fail(name, "storage class is not a global");
  DType dt;
  switch (p[1]->global) {
    case pickle::Global::float_storage: dt = DType::f32; break;
    case pickle::Global::half_storage: dt = DType::f16; break;
    case pickle::Global::bfloat16_storage: dt = DType::bf16; break;
    default: c.fail(name, "unsupported storage class '" + p[1]->s + "'");
  }
  if (p[2]->kind != Value::Kind::string) c.fail(name, "storage key is not a string");
  int64_t storage_numel = as_int(c, name, p[4], "storage numel");
  if (storage_numel < 0 || storage_numel > kMaxElems) c.fail(name, "storage numel out of range");
  auto blob = c.entries.find(c.top + "data/" + p[2]->s);
  if (blob == c.entries.end()) c.fail(name, "storage blob '" + c.top + "data/" + p[2]->s + "' missing from the archive");
  const size_t es = dtype_size(dt);
  if (blob->second.size < uint64_t(storage_numel) * es)
    c.fail(name, "storage blob has " + std::to_string(blob->second.size) + " bytes, needs " +
                     std::to_string(uint64_t(storage_numel) * es));

  int64_t offset = as_int(c, name, args[1], "storage offset");
  std::vector<int64_t> shape = as_int_tuple(c, name, args[2], "size");
  std::vector<int64_t> stride = as_int_tuple(c, name, args[3], "stride");
  if (stride.size() != shape.size()) c.fail(name, "size and stride have different ranks");
  // Materialising a strided tensor costs numel x rank: bound the rank (PyTorch itself caps it at 64).
  if (shape.size() > 64) c.fail(name, "rank " + std::to_string(shape.size()) + " exceeds 64");
  if (offset < 0 || offset > storage_numel) c.fail(name, "storage offset out of range");
  // Extent check: the last element reached must lie inside the storage; also detect contiguity.
  // `nonzero` (the product of the non-zero sizes) is bounded too: with a 0 in the shape, the other sizes
  // must not multiply past int64 (StoredTensor::numel, config code).
  int64_t numel = 1, nonzero = 1, last = offset, expect = 1;
  bool contiguous = true;
  for (size_t d = shape.size(); d-- > 0;) {
    if (shape[d] != 0 && nonzero > kMaxElems / shape[d]) c.fail(name, "too many elements");
    if (shape[d] != 0) nonzero *= shape[d];
    numel *= shape[d];
    if (shape[d] > 1 && stride[d] != expect) contiguous = false;
    expect *= shape[d];
  }
  if (numel > 0) {
    for (size_t d = 0; d < shape.size(); ++d) {
      if (stride[d] != 0 && shape[d] - 1 > (kMaxElems - last) / stride[d]) c.fail(name, "strides overflow");
      last += (shape[d] - 1) * stride[d];
    }
    if (last >= storage_numel) c.fail(name, "shape/stride reach element " + std::to_string(last) +
                                                " of a storage with " + std::to_string(storage_numel));
  }
  // A strided view with more elements than its storage repeats elements (stride 0, expand); its copy
  // could be arbitrarily larger than the file, so it is refused.
  if (!contiguous && numel > storage_numel)
    c.fail(name, "strided view of " + std::to_string(numel) + " elements overlaps itself in a storage of " +
                     std::to_string(storage_numel) + " (expanded/overlapping strides are not supported)");
  StoredTensor t;
  t.name = name;
  t.dtype = dt;
  t.shape = shape;
  const uint8_t* base = c.file.data() + blob->second.data_offset;
  if (contiguous) {
    t.data = base + size_t(offset) * es;
  } else {
    auto buf = std::make_shared<std::vector<uint8_t>>(size_t(numel) * es);
    std::vector<int64_t> idx(shape.size(), 0);
    for (int64_t n = 0; n < numel; ++n) {
      int64_t src = offset;
      for (size_t d = 0; d < shape.size(); ++d) src += idx[d] * stride[d];
      std::memcpy(buf->data() + size_t(n) * es, base + size_t(src) * es, es);
      for (size_t d = shape.size(); d-- > 0;) {
        if (++idx[d] < shape[d]) break;
        idx[d] = 0;
      }
    }
    t.data = buf->data();
    store.owned.push_back(buf);
  }
  if (!store.tensors.emplace(name, std::move(t)).second) c.fail(name, "appears twice");
}

}  // namespace

TensorStore parse_pth(std::shared_ptr<const MappedFile> file) {
  PthContext c{*file, read_zip_directory(*file), ""};
  const ZipEntry* pkl = nullptr;
  for (const auto& [name, e] : c.entries) {
    if (name == "data.pkl" || (name.size() > 9 && name.ends_with("/data.pkl") &&
                               name.find('/') == name.size() - 9)) {
      if (pkl) throw Error(file->path() + ": archive holds more than one data.pkl");
      pkl = &e;
      c.top = name.substr(0, name.size() - 8);
    }
  }
  if (!pkl) throw Error(file->path() + ": not a PyTorch checkpoint (no <top>/data.pkl in the zip archive)");
  pickle::Document doc = pickle::unpickle(
      std::string_view(reinterpret_cast<const char*>(file->data() + pkl->data_offset), pkl->size), file->path());
  if (doc.root->kind != Value::Kind::dict)
    throw Error(file->path() + ": data.pkl does not hold a dict of tensors (a state_dict)");
  TensorStore store;
  store.path = file->path();
  store.format = "pth";
  for (const auto& [k, v] : doc.root->entries) {
    if (k->kind != Value::Kind::string) throw Error(file->path() + ": data.pkl: a state_dict key is not a string");
    add_tensor(store, c, k->s, v);
  }
  store.file = std::move(file);
  store.share_ownership();
  return store;
}

}  // namespace rwkvx
