#include "core/error.h"

namespace rwkvx {

void assert_fail(const char* expr, const char* file, int line, const std::string& msg) {
  throw Error(std::string("internal error (please report): ") + expr + " failed at " + file + ":" +
              std::to_string(line) + (msg.empty() ? "" : ": " + msg));
}

}  // namespace rwkvx
