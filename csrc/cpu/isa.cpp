// Runtime ISA selection shared by the CPU kernels; see isa.h.
#include "cpu/isa.h"

#include <cstdlib>
#include <string>

namespace quantkit {
namespace cpu {

Isa select_isa(bool avx2_needs_f16c) {
  Isa best = Isa::Scalar;
#if QK_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      (!avx2_needs_f16c || __builtin_cpu_supports("f16c")))
    best = Isa::Avx2;
  if (__builtin_cpu_supports("avx512f")) best = Isa::Avx512;
#endif
  if (const char* env = std::getenv("QUANTKIT_CPU_ISA")) {
    const std::string s(env);
    if (s == "scalar") best = Isa::Scalar;
    else if (s == "avx2" && best >= Isa::Avx2) best = Isa::Avx2;
  }
  return best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace cpu
}  // namespace quantkit
