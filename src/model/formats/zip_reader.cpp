#include "model/formats/zip_reader.h"

#include <cstring>

#include "core/error.h"

namespace rwkvx {
namespace {

class Reader {
 public:
  Reader(const MappedFile& f) : f_(f) {}
  [[noreturn]] void fail(const std::string& what) const {
    throw Error(f_.path() + ": corrupt zip archive: " + what);
  }
  void need(uint64_t off, uint64_t n, const char* what) const {
    if (off > f_.size() || n > f_.size() - off) fail(std::string(what) + " lies outside the file");
  }
  uint64_t le(uint64_t off, int n) const {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = v << 8 | f_.data()[off + i];
    return v;
  }
  const MappedFile& f_;
};

constexpr uint32_t kEocdSig = 0x06054b50, kZip64EocdSig = 0x06064b50, kZip64LocSig = 0x07064b50,
                   kCentralSig = 0x02014b50, kLocalSig = 0x04034b50;

}  // namespace

std::map<std::string, ZipEntry> read_zip_directory(const MappedFile& file) {
  Reader r(file);
  const uint64_t n = file.size();
  if (n < 22) r.fail("file too short (" + std::to_string(n) + " bytes) for an end-of-directory record");
  // The end-of-central-directory record sits in the last 22 + 65535 bytes.
  uint64_t eocd = UINT64_MAX;
  uint64_t lowest = n >= 22 + 65535 ? n - 22 - 65535 : 0;
  for (uint64_t p = n - 22 + 1; p-- > lowest;) {
    if (r.le(p, 4) == kEocdSig) {
      eocd = p;
      break;
    }
  }
  if (eocd == UINT64_MAX) r.fail("no end-of-central-directory record (truncated file?)");
  uint64_t count = r.le(eocd + 10, 2), cd_size = r.le(eocd + 12, 4), cd_off = r.le(eocd + 16, 4);
  if (count == 0xffff || cd_size == 0xffffffff || cd_off == 0xffffffff) {
    if (eocd < 20 || r.le(eocd - 20, 4) != kZip64LocSig) r.fail("ZIP64 locator missing");
    uint64_t z64 = r.le(eocd - 20 + 8, 8);
    r.need(z64, 56, "ZIP64 end record");
    if (r.le(z64, 4) != kZip64EocdSig) r.fail("bad ZIP64 end record signature");
    count = r.le(z64 + 32, 8);
    cd_size = r.le(z64 + 40, 8);
    cd_off = r.le(z64 + 48, 8);
  }
  r.need(cd_off, cd_size, "central directory");
  if (count > cd_size / 46) r.fail("entry count " + std::to_string(count) + " exceeds directory size");

  std::map<std::string, ZipEntry> entries;
  uint64_t p = cd_off;
  for (uint64_t i = 0; i < count; ++i) {
    r.need(p, 46, "central directory entry");
    if (r.le(p, 4) != kCentralSig) r.fail("bad central directory signature at entry " + std::to_string(i));
    uint64_t flags = r.le(p + 8, 2), method = r.le(p + 10, 2);
    uint64_t csize = r.le(p + 20, 4), usize = r.le(p + 24, 4);
    uint64_t name_len = r.le(p + 28, 2), extra_len = r.le(p + 30, 2), comment_len = r.le(p + 32, 2);
    uint64_t local = r.le(p + 42, 4);
    r.need(p + 46, name_len + extra_len + comment_len, "central directory entry name");
    std::string name(reinterpret_cast<const char*>(file.data() + p + 46), name_len);
    // ZIP64 extended information: the 0xffffffff fields follow in order usize, csize, offset.
    uint64_t x = p + 46 + name_len, xend = x + extra_len;
    while (x + 4 <= xend) {
      uint64_t id = r.le(x, 2), len = r.le(x + 2, 2);
      if (x + 4 + len > xend) r.fail("entry '" + name + "': extra field overruns");
      if (id == 1) {
        uint64_t q = x + 4, qend = q + len;
        auto take = [&](uint64_t& v) {
          if (v != 0xffffffff) return;
          if (q + 8 > qend) r.fail("entry '" + name + "': short ZIP64 field");
          v = r.le(q, 8);
          q += 8;
        };
        take(usize);
        take(csize);
        take(local);
      }
      x += 4 + len;
    }
    if (flags & 1) r.fail("entry '" + name + "' is encrypted");
    if (method != 0)
      throw Error(file.path() + ": zip entry '" + name + "' is compressed (method " + std::to_string(method) +
                  "); PyTorch checkpoints store entries uncompressed: re-save it with torch.save");
    if (csize != usize) r.fail("entry '" + name + "': stored sizes disagree");
    r.need(local, 30, "local header");
    if (r.le(local, 4) != kLocalSig) r.fail("entry '" + name + "': bad local header signature");
    uint64_t data = local + 30 + r.le(local + 26, 2) + r.le(local + 28, 2);
    r.need(data, usize, ("entry '" + name + "' data").c_str());
    if (!entries.emplace(name, ZipEntry{name, data, usize}).second) r.fail("duplicate entry '" + name + "'");
    p += 46 + name_len + extra_len + comment_len;
  }
  return entries;
}

}  // namespace rwkvx
