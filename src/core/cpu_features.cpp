#include "core/cpu_features.h"

#include <cstdlib>
#include <mutex>

#include "core/error.h"

namespace rwkvx {
namespace {

std::string g_forced;
std::once_flag g_env_once;

Isa parse_isa(const std::string& s) {
  if (s == "scalar") return Isa::scalar;
  if (s == "avx2") return Isa::avx2;
  if (s == "avx512") return Isa::avx512;
  throw Error("unknown instruction set '" + s + "' (use scalar, avx2 or avx512)");
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "?";
}

bool cpu_supports(Isa isa) {
#if defined(__x86_64__)
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == Isa::scalar;
#endif
}

void set_forced_isa(const std::string& name) {
  if (!name.empty()) {
    Isa isa = parse_isa(name);
    if (!cpu_supports(isa)) throw Error(std::string("this CPU does not support ") + isa_name(isa));
  }
  g_forced = name;
}

Isa active_isa() {
  std::call_once(g_env_once, [] {
    if (const char* env = std::getenv("RWKVX_ISA"); env && *env && g_forced.empty()) set_forced_isa(env);
  });
  if (!g_forced.empty()) return parse_isa(g_forced);
  if (cpu_supports(Isa::avx512)) return Isa::avx512;
  if (cpu_supports(Isa::avx2)) return Isa::avx2;
  return Isa::scalar;
}

std::string cpu_description() {
  std::string s = isa_name(active_isa());
  s += std::string(" (supported: scalar") + (cpu_supports(Isa::avx2) ? ", avx2" : "") +
       (cpu_supports(Isa::avx512) ? ", avx512" : "") + ")";
  return s;
}

}  // namespace rwkvx
