// libFuzzer target for the restricted unpickler (src/model/formats/pickle.cpp) on raw bytes. When the
// bytes unpickle, they are also wrapped as the data.pkl of an in-memory stored zip, beside four small
// storage blobs "m/data/0".."m/data/3", and read with parse_pth: this drives the tensor rebuilding in
// pth.cpp (persistent ids, storage classes, offsets, sizes, strides) with arbitrary pickles, which
// fuzz_pth rarely reaches because mutations there mostly break the zip. Only rwkvx::Error may escape.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/error.h"
#include "core/mapped_file.h"
#include "fuzz_common.h"
#include "model/formats/pickle.h"
#include "model/formats/tensor_store.h"

namespace {

void le(std::vector<uint8_t>& b, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(uint8_t(v >> (8 * i)));
}

// A stored zip (CRC left 0: the reader does not check it).
std::vector<uint8_t> make_zip(const std::vector<std::pair<std::string, std::string_view>>& entries) {
  std::vector<uint8_t> z, cd;
  for (const auto& [name, data] : entries) {
    const size_t local = z.size();
    le(z, 0x04034b50, 4);
    le(z, 20, 2);
    le(z, 0, 2);
    le(z, 0, 2);
    le(z, 0, 4);
    le(z, 0, 4);
    le(z, data.size(), 4);
    le(z, data.size(), 4);
    le(z, name.size(), 2);
    le(z, 0, 2);
    z.insert(z.end(), name.begin(), name.end());
    z.insert(z.end(), data.begin(), data.end());
    le(cd, 0x02014b50, 4);
    le(cd, 20, 2);
    le(cd, 20, 2);
    le(cd, 0, 2);
    le(cd, 0, 2);
    le(cd, 0, 4);
    le(cd, 0, 4);
    le(cd, data.size(), 4);
    le(cd, data.size(), 4);
    le(cd, name.size(), 2);
    le(cd, 0, 2);
    le(cd, 0, 2);
    le(cd, 0, 2);
    le(cd, 0, 2);
    le(cd, 0, 4);
    le(cd, local, 4);
    cd.insert(cd.end(), name.begin(), name.end());
  }
  const size_t cd_off = z.size();
  z.insert(z.end(), cd.begin(), cd.end());
  le(z, 0x06054b50, 4);
  le(z, 0, 4);
  le(z, entries.size(), 2);
  le(z, entries.size(), 2);
  le(z, cd.size(), 4);
  le(z, cd_off, 4);
  le(z, 0, 2);
  return z;
}

// Blob k holds 16 << k bytes (16, 32, 64, 128) of a simple pattern.
const std::string& blob(int k) {
  static const std::vector<std::string> blobs = [] {
    std::vector<std::string> v;
    for (int i = 0; i < 4; ++i) {
      std::string b(size_t(16) << i, '\0');
      for (size_t j = 0; j < b.size(); ++j) b[j] = char(j * 37 + 11);
      v.push_back(b);
    }
    return v;
  }();
  return blobs[size_t(k)];
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Exact-size heap copy, so that ASan sees any read past the end.
  const std::vector<char> bytes(data, data + size);
  const std::string_view pkl(bytes.data(), bytes.size());
  try {
    rwkvx::pickle::Document doc = rwkvx::pickle::unpickle(pkl, "fuzz.pkl");
    if (doc.root == nullptr) __builtin_trap();
  } catch (const rwkvx::Error&) {
    return 0;
  }
  auto file = rwkvx::MappedFile::from_bytes(
      "fuzz.pth", make_zip({{"m/data.pkl", pkl}, {"m/data/0", blob(0)}, {"m/data/1", blob(1)},
                            {"m/data/2", blob(2)}, {"m/data/3", blob(3)}}));
  try {
    rwkvx::TensorStore store = rwkvx::parse_pth(file);
    rwkvx::fuzz::touch_all_tensors(store);
  } catch (const rwkvx::Error&) {
  }
  return 0;
}
