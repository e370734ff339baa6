// Integer parsing for user input (CLI options, token files, checkpoint metadata, environment variables): the
// callers decide what is valid and word their own error, naming the option, file, field or variable.
#pragma once
#include <cstddef>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "core/error.h"

namespace rwkvx {

// The integer at the start of `s` (std::stoll's syntax); `used` gets how many characters it took, 0 when
// `s` does not start with one or it is out of the long long range (then the result is 0).
inline long long leading_integer(const std::string& s, std::size_t& used) {
  used = 0;
  try {
    return std::stoll(s, &used);
  } catch (const std::logic_error&) {  // std::invalid_argument, std::out_of_range
    used = 0;
    return 0;
  }
}

// A row count from environment variable `name` (a whole decimal number in [1, 2^24]), or `fallback` when it
// is unset or empty; anything else is an error naming the variable.
inline long long env_row_count(const char* name, long long fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  std::size_t used = 0;
  const long long n = leading_integer(v, used);
  if (used == 0 || v[used] != '\0' || n < 1 || n > (1LL << 24))
    throw Error(std::string(name) + "='" + v + "': expected a row count from 1 to 16777216");
  return n;
}

}  // namespace rwkvx
