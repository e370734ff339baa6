// Shared helpers for the tests: golden-case paths, binary file reading, error metrics.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"

namespace rwkvx::test {

// The environment variable RWKVX_SHARED_DIR, when set, overrides the build-time path (runs on another machine).
inline std::string shared_dir() {
  const char* env = std::getenv("RWKVX_SHARED_DIR");
  return env && *env ? env : RWKVX_SHARED_DIR;
}
inline std::string golden_dir(const std::string& name) { return shared_dir() + "/golden/" + name; }

inline std::vector<float> read_f32_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw Error(path + ": cannot open");
  std::vector<float> v(size_t(in.tellg()) / 4);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(v.data()), std::streamsize(v.size() * 4));
  return v;
}

// max |a - b| / max |b|: the golden-case criterion (spec model.md §8).
// The reference b may be float or double (a double reference is not rounded first).
template <class R>
double rel_max_err(const std::vector<float>& a, const std::vector<R>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num = std::max(num, std::fabs(double(a[i]) - double(b[i])));
    den = std::max(den, std::fabs(double(b[i])));
  }
  if (a.size() != b.size()) return INFINITY;
  return den > 0 ? num / den : num;
}

}  // namespace rwkvx::test
