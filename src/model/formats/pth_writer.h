// Writes PyTorch `.pth` checkpoints (a state_dict of tensors) that torch.load(weights_only=True) and our
// own reader (pth.cpp) both accept: `rwkvx expand`, training checkpoints in the official layout.
//
// Layout, as torch.save (zipfile serialization, format version 3) lays it out:
//
//   archive/data.pkl              pickle protocol 2: a dict {name: _rebuild_tensor_v2(...)}; every tensor is
//                                 torch._utils._rebuild_tensor_v2(persistent_id('storage', torch.<T>Storage,
//                                 '<key>', 'cpu', numel), 0, size, contiguous stride, False, OrderedDict())
//   archive/.format_version       "1"
//   archive/.storage_alignment    "64"
//   archive/byteorder             "little"
//   archive/data/<key>            one storage per tensor (key "0", "1", ... in order), raw little-endian bytes
//   archive/version               "3\n"
//
// Zip details: every entry is stored (method 0) with its CRC-32 and sizes in the local header (no data
// descriptors), names are flagged UTF-8, and each local header carries a "FB" (0x4246) padding extra field
// so that entry data starts on a 64-byte boundary (torch pads the same way, which lets torch.load(mmap=True)
// map storages in place). Entries, offsets or counts past the 32-bit limits switch to ZIP64 (extra field
// 0x0001 in the local and central headers, ZIP64 end-of-directory record and locator).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/formats/safetensors_writer.h"

namespace rwkvx {

struct PthWriteOptions {
  // Top-level directory of every entry (torch uses the file's stem, or "archive" for in-memory saves).
  std::string archive_name = "archive";
  // Writes ZIP64 records even when nothing needs them (tests exercise that path on small files).
  bool force_zip64 = false;
};

// The whole file as bytes; tensors keep the given order in the state_dict.
std::vector<uint8_t> serialize_pth(const std::vector<TensorData>& tensors, const PthWriteOptions& options = {});
// Writes atomically (temp file, fsync, rename). Throws rwkvx::Error naming the path on I/O errors and
// on tensors whose byte size does not match dtype x shape.
void save_pth(const std::string& path, const std::vector<TensorData>& tensors, const PthWriteOptions& options = {});

// CRC-32 (IEEE 802.3, as zip uses it), continued from `crc` (0 to start).
uint32_t crc32_update(uint32_t crc, const void* data, size_t n);

}  // namespace rwkvx
