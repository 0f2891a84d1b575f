// What every CPU kernel file in csrc/cpu/ shares: the runtime vector-ISA choice and the
// scalar fp32 <-> bf16/fp16 element converts. Torch-free apart from c10's BFloat16/Half.
//
// Vectorisation without -march=native: hot functions exist in AVX-512F / AVX2 / plain C++
// versions (GCC `target` attributes) and one is picked at runtime from cpuid, so one build
// runs on any x86-64 (non-x86 builds get the scalar code only).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "cpu/lut4_linear.h"  // DType

// QK_X86: whether the AVX-512 / AVX2 variants (and <immintrin.h>) are compiled at all.
#if defined(__x86_64__) || defined(_M_X64)
#define QK_X86 1
#include <immintrin.h>
#else
#define QK_X86 0
#endif

namespace quantkit {
namespace cpu {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// The best ISA this CPU runs: Avx512 when it has AVX-512F, else Avx2 when it has AVX2 + FMA
// (+ F16C when avx2_needs_f16c), else Scalar. QUANTKIT_CPU_ISA=avx2|scalar can only lower
// the choice (the tests exercise every variant this way). Reads cpuid and the environment on
// every call: kernels cache the result in a function-local static.
Isa select_isa(bool avx2_needs_f16c);

// "avx512", "avx2" or "scalar" (what quantkit._C.*cpu_isa() report).
const char* isa_name(Isa isa);

// Element i of an array of type t, as fp32 (exact).
inline float load_as_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::BF16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case DType::F16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Stores v as element i of an array of type t, rounded to nearest even like Tensor.to().
inline void store_from_float(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::BF16: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v); break;
    case DType::F16: static_cast<c10::Half*>(p)[i] = c10::Half(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// fp16 bits -> fp32, exact.
inline float half_bits_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

}  // namespace cpu
}  // namespace quantkit
