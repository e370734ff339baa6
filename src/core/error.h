// Error handling. Bad input (files, tokens, options, requests) throws rwkvx::Error with a message that
// names the file and the tensor/field/token at fault; RWKVX_ASSERT is only for our own broken invariants.
#pragma once
#include <stdexcept>
#include <string>
#include <utility>

namespace rwkvx {

class Error : public std::runtime_error {
 public:
  explicit Error(std::string msg) : std::runtime_error(std::move(msg)) {}
};

[[noreturn]] void assert_fail(const char* expr, const char* file, int line, const std::string& msg);

}  // namespace rwkvx

#define RWKVX_ASSERT(cond, msg)                                         \
  do {                                                                  \
    if (!(cond)) ::rwkvx::assert_fail(#cond, __FILE__, __LINE__, (msg)); \
  } while (0)
