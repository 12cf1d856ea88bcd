#include "cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace infertrix {

namespace {

Isa parse(const std::string& name) {
  if (name == "scalar") return Isa::Scalar;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx512_vnni" || name == "auto" || name.empty()) return Isa::Avx512Vnni;
  throw std::invalid_argument("infertrix: unknown CPU ISA '" + name +
                              "'; use one of auto, avx512_vnni, avx2, scalar");
}

Isa initial_request() {
  const char* env = std::getenv("INFERTRIX_CPU_ISA");
  return env ? parse(env) : Isa::Avx512Vnni;
}

std::atomic<int> requested{static_cast<int>(initial_request())};

}  // namespace

Isa detected_isa() {
#if INFERTRIX_X86
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
      return Isa::Avx512Vnni;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
    return Isa::Scalar;
  }();
  return isa;
#else
  return Isa::Scalar;
#endif
}

Isa active_isa() {
  int req = requested.load(std::memory_order_relaxed);
  int det = static_cast<int>(detected_isa());
  return static_cast<Isa>(req < det ? req : det);
}

Isa set_requested_isa(const std::string& name) {
  requested.store(static_cast<int>(parse(name)));
  return active_isa();
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Vnni:
      return "avx512_vnni";
    case Isa::Avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

}  // namespace infertrix
