#include "core/cpu_features.h"

#include <cstdlib>
#include <mutex>

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "core/error.h"

namespace rwkvx {
namespace {

std::string g_forced, g_env;
std::once_flag g_env_once;

Isa parse_isa(const std::string& s) {
  if (s == "scalar") return Isa::scalar;
  if (s == "avx2") return Isa::avx2;
  if (s == "avx512") return Isa::avx512;
  if (s == "amx") return Isa::amx;
  throw Error("unknown instruction set '" + s + "' (use scalar, avx2, avx512 or amx)");
}

// AMX-BF16 tiles: CPUID leaf 7 reports AMX-TILE (EDX bit 24), AMX-BF16 (EDX bit 22) and, in sub-leaf 1,
// AVX512-BF16 (EAX bit 5, used to split activations); Linux then hands out the 8 KB of tile state per
// thread only to processes that ask for it (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, feature 18).
bool amx_usable() {
#if defined(__linux__) && defined(__x86_64__)
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) return false;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::amx: return "amx";
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
    case Isa::amx: return cpu_supports(Isa::avx512) && amx_usable();
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
  // Only read the variable under call_once: an exception must not unwind through pthread_once (with a
  // statically linked libgcc that aborts), so a bad value is reported below, on every call.
  std::call_once(g_env_once, [] {
    if (const char* env = std::getenv("RWKVX_ISA")) g_env = env;
  });
  if (!g_forced.empty()) return parse_isa(g_forced);
  if (!g_env.empty()) {
    try {
      const Isa isa = parse_isa(g_env);
      if (!cpu_supports(isa)) throw Error(std::string("this CPU does not support ") + isa_name(isa));
      return isa;
    } catch (const Error& e) {
      throw Error(std::string("RWKVX_ISA: ") + e.what());
    }
  }
  if (cpu_supports(Isa::amx)) return Isa::amx;
  if (cpu_supports(Isa::avx512)) return Isa::avx512;
  if (cpu_supports(Isa::avx2)) return Isa::avx2;
  return Isa::scalar;
}

std::string cpu_description() {
  std::string s = isa_name(active_isa());
  s += std::string(" (supported: scalar") + (cpu_supports(Isa::avx2) ? ", avx2" : "") +
       (cpu_supports(Isa::avx512) ? ", avx512" : "") + (cpu_supports(Isa::amx) ? ", amx" : "") + ")";
  return s;
}

}  // namespace rwkvx
