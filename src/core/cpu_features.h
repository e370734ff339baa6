// Instruction sets for the CPU backend's kernels, detected once at start-up (the one dispatch point).
// RWKVX_ISA=scalar|avx2|avx512|amx in the environment, or set_forced_isa() in tests, forces a lower path.
// amx = the AVX-512 kernels plus AMX-BF16 tile GEMMs for prefill (Sapphire Rapids and later).
#pragma once
#include <string>

namespace rwkvx {

enum class Isa { scalar, avx2, avx512, amx };

const char* isa_name(Isa isa);
// What this CPU can run (AVX2 needs FMA and F16C too; AVX-512 needs F, BW, VL, DQ; AMX needs AVX-512
// with BF16, AMX-TILE and AMX-BF16, and the kernel's permission for tile state, asked for on first call).
bool cpu_supports(Isa isa);
// The best supported ISA, or the forced one; throws rwkvx::Error if forced to one the CPU lacks.
Isa active_isa();
void set_forced_isa(const std::string& name);  // "" clears; throws on unknown or unsupported names
std::string cpu_description();  // e.g. "avx2 (avx512: no)"

}  // namespace rwkvx
