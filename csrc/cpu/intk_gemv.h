// int-k small-m product with AVX-512, for bit widths dividing 8 (see intk_gemv.cpp).
#pragma once

#include <cstdint>

#include "cpu/intk_linear.h"

namespace quantkit {
namespace cpu {

// Whether intk_gemv_avx512 runs this weight here: the CPU has AVX-512F (and
// QUANTKIT_CPU_ISA does not lower the choice) and bits is 1, 2, 4 or 8.
bool intk_gemv_supported(const IntKWeight& w);

// y[i, n] = sum_k x[i, k] * W[n, k] (+ bias[n]), like intk_gemm_small; only when
// intk_gemv_supported(w). x fp32 [m, K] contiguous; bias fp32 [N] or nullptr; y fp32 [m, N].
void intk_gemv_avx512(const IntKWeight& w, const float* x, int64_t m, const float* bias, float* y);

}  // namespace cpu
}  // namespace quantkit
