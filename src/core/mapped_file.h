// Read-only memory map of a whole file (falls back to reading it when mmap is unavailable).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace rwkvx {

class MappedFile {
 public:
  // Throws rwkvx::Error naming `path` if it cannot be opened or read.
  static std::shared_ptr<const MappedFile> open(const std::string& path);
  // Wraps bytes already in memory (fuzzers, tests); `name` is used in error messages.
  static std::shared_ptr<const MappedFile> from_bytes(std::string name, std::vector<uint8_t> bytes);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;
  std::vector<uint8_t> owned_;
};

}  // namespace rwkvx
