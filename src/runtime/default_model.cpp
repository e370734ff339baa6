#include "runtime/default_model.h"

#include <cstdlib>
#include <filesystem>
#include <vector>

namespace rwkvx {

std::string default_model_path() {
  if (const char* env = std::getenv("RWKVX_MODEL"); env != nullptr && env[0] != '\0') return env;
  std::vector<std::string> candidates;
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec && !exe.empty()) {
    const std::filesystem::path dir = exe.parent_path();
    candidates.push_back((dir / ".." / "data" / "models" / kDefaultModelFile).lexically_normal().string());
    candidates.push_back((dir / ".." / "share" / "rwkvx" / "models" / kDefaultModelFile).lexically_normal().string());
  }
#ifdef RWKVX_SOURCE_DIR
  candidates.push_back(std::string(RWKVX_SOURCE_DIR) + "/data/models/" + kDefaultModelFile);
#endif
  if (candidates.empty()) return std::string("data/models/") + kDefaultModelFile;
  for (const auto& c : candidates)
    if (std::filesystem::is_regular_file(c, ec)) return c;
  return candidates.back();
}

}  // namespace rwkvx
