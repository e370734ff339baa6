// Small helpers shared by the CUDA benchmark programs' argument parsing.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace rwkvx::bench {

// "4096,131072" → {4096, 131072} (empty items skipped).
inline std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> v;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    if (j > i) v.push_back(std::stoll(s.substr(i, j - i)));
    i = j + 1;
  }
  return v;
}

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace rwkvx::bench
