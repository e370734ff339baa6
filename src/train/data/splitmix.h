// splitmix64: a tiny portable generator, so a seed gives the same shuffle or initialisation on every
// platform (unlike std::uniform_*_distribution). Used by expand (random init) and make_data (shuffle).
#pragma once
#include <cstdint>

namespace rwkvx {

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : s_(seed * 0x9e3779b97f4a7c15ull + 0x2545f4914f6cdd1dull) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [-a, a).
  float uniform(double a) { return float((double(next() >> 11) * 0x1.0p-53 * 2.0 - 1.0) * a); }
  // Uniform in [0, n) for n >= 1 (the modulo bias, at most n / 2^64, is negligible here).
  uint64_t below(uint64_t n) { return next() % n; }

 private:
  uint64_t s_;
};

}  // namespace rwkvx
