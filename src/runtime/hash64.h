// A fast non-cryptographic 64-bit hash for fingerprints and corruption checks (state files, model
// identity). It mixes 8 bytes per step (multiply-xorshift, as in splitmix64), so hashing hundreds of
// megabytes of state costs a fraction of a second. It detects accidental differences, not forgeries.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace rwkvx {

class Hash64 {
 public:
  // Streaming: any split of the same bytes into update() calls gives the same digest.
  void update(const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    length_ += n;
    while (n && tail_len_) {
      tail_ |= uint64_t(*p++) << (8 * tail_len_);
      --n;
      if (++tail_len_ == 8) {
        mix(tail_);
        tail_ = 0;
        tail_len_ = 0;
      }
    }
    for (; n >= 8; p += 8, n -= 8) {
      uint64_t w;
      std::memcpy(&w, p, 8);  // little-endian hosts only, like the file formats themselves
      mix(w);
    }
    for (; n; --n) tail_ |= uint64_t(*p++) << (8 * tail_len_++);
  }
  void update(std::string_view s) {
    update_u64(s.size());
    update(s.data(), s.size());
  }
  void update_u64(uint64_t v) { update(&v, sizeof v); }
  uint64_t digest() const {
    uint64_t h = h_;
    if (tail_len_) h = finalize(h ^ tail_) + 0x9e3779b97f4a7c15ULL;
    return finalize(h ^ length_);
  }
  std::string hex() const {
    static const char* digits = "0123456789abcdef";
    std::string s(16, '0');
    uint64_t d = digest();
    for (int i = 15; i >= 0; --i, d >>= 4) s[size_t(i)] = digits[d & 15];
    return s;
  }

 private:
  static uint64_t finalize(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  void mix(uint64_t w) { h_ = finalize(h_ ^ w) + 0x9e3779b97f4a7c15ULL; }
  uint64_t h_ = 0x243f6a8885a308d3ULL;
  uint64_t length_ = 0;
  uint64_t tail_ = 0;  // bytes of an incomplete word
  unsigned tail_len_ = 0;
};

}  // namespace rwkvx
