// Run-time choice of the CPU instruction set for infertrix kernels.
//
// Kernels are compiled once for every ISA with GCC/Clang function target attributes, so the
// same binary runs on any x86-64 CPU; `active_isa()` picks the best one the CPU supports, or a
// lower one requested through INFERTRIX_CPU_ISA / infertrix._C.set_cpu_isa (tests use this to
// check every path against the PyTorch reference).
#pragma once

#include <cstdint>
#include <string>

namespace infertrix {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512Vnni = 2 };

// Best ISA this CPU supports.
Isa detected_isa();
// ISA the kernels use now: min(detected, requested).
Isa active_isa();
// Request an ISA by name ("scalar", "avx2", "avx512_vnni", or "auto"); returns the active one.
Isa set_requested_isa(const std::string& name);
const char* isa_name(Isa isa);

}  // namespace infertrix

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define INFERTRIX_X86 1
#include <immintrin.h>
#define INFERTRIX_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define INFERTRIX_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
#else
#define INFERTRIX_X86 0
#endif

#if INFERTRIX_X86
namespace infertrix {
// The first min(n, 16) lanes of a 16-lane mask (n >= 0): the tail of a loop over 16-wide vectors.
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}
}  // namespace infertrix
#endif
