// Crash-safe output: write to "<path>.tmp.<pid>", fsync, rename over <path>. If commit() is never
// reached (error, exception) the temp file is removed and <path> is left untouched.
#pragma once
#include <cstddef>
#include <cstdio>
#include <string>

namespace rwkvx {

class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);  // throws rwkvx::Error naming the path
  void commit();                           // flush, fsync, rename; throws on failure

 private:
  std::string path_, tmp_;
  std::FILE* f_ = nullptr;
};

}  // namespace rwkvx
