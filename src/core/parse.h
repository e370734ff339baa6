// Integer parsing for user input (CLI options, token files, checkpoint metadata): the callers decide
// what is valid and word their own error, naming the option, file or field.
#pragma once
#include <cstddef>
#include <stdexcept>
#include <string>

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

}  // namespace rwkvx
