// Minimal read-only ZIP reader for PyTorch checkpoints: central directory, ZIP64, stored entries.
// Written here rather than using libzip because mmap-ing tensors needs each entry's data offset,
// which libzip does not expose. Compressed or encrypted entries are refused (torch.save never makes them).
#pragma once
#include <cstdint>
#include <map>
#include <string>

#include "core/mapped_file.h"

namespace rwkvx {

struct ZipEntry {
  std::string name;
  uint64_t data_offset = 0;  // absolute offset of the entry's bytes in the file
  uint64_t size = 0;
};

// Parses the central directory of `file`; throws rwkvx::Error naming the file on any inconsistency.
std::map<std::string, ZipEntry> read_zip_directory(const MappedFile& file);

}  // namespace rwkvx
