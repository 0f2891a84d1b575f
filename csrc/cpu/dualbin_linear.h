// dualbin (DB-LLM Flexible Dual Binarization) CPU kernels: raw-pointer interface.
//
// Format (quantkit/formats/dualbin.py, docs/format.md): W [N, K] = alpha1 * b1 + alpha2 * b2
// per group of `group` weights along K. Each plane is uint8 [N, row_bytes] with
// row_bytes = G * group / 8, G = ceil(K / group); element k of a row is bit k % 8 of byte
// k / 8 (LSB first); bits past K are 0. alpha1/alpha2 are fp16 [N, G] (raw bits here).
#pragma once

#include <cstdint>

#include "cpu/lut4_linear.h"  // DType

namespace quantkit {
namespace cpu {

struct DualBinWeight {
  const uint8_t* plane1;    // uint8 [rows, row_bytes]
  const uint8_t* plane2;    // uint8 [rows, row_bytes]
  const uint16_t* alpha1;   // fp16 bits [rows, groups]
  const uint16_t* alpha2;   // fp16 bits [rows, groups]
  int64_t group;            // weights per scale pair along K (multiple of 16)
  int64_t rows;             // N = out_features
  int64_t cols;             // K = in_features
  int64_t groups;           // G = ceil(K / group)
  int64_t row_bytes;        // G * group / 8
};

// Rows [r0, r1) of the dequantized weight, fp32 [r1 - r0, cols]: exactly alpha*bit sums
// as the reference computes them (a1*b1 + a2*b2 in fp32).
void dualbin_dequantize_rows(const DualBinWeight& w,  // packed weight
                             int64_t r0,              // first row
                             int64_t r1,              // end row
                             float* out);             // fp32 [r1 - r0, cols]

// y[i, n] = sum_g (a1[n,g] * sum_{k in g, b1} x[i,k] + a2[n,g] * sum_{k in g, b2} x[i,k])
//           + bias[n], fp32 accumulation; decodes nothing: the plane bits are used as
// masks of masked adds. For small m (one pass over the planes per block of 4 x rows).
// x of any dtype is converted to fp32 first; y is rounded to xt once.
void dualbin_gemm_small(const DualBinWeight& w,  // packed weight [N, K]
                        const void* x,           // [m, K] contiguous activations of type xt
                        DType xt,                // dtype of x and of y
                        int64_t m,               // rows of x
                        const void* bias,        // [N] of type bt, or nullptr
                        DType bt,                // dtype of bias
                        void* y);                // [m, N] contiguous output of type xt

// "avx512" or "scalar": the variant dualbin_gemm_small runs (QUANTKIT_CPU_ISA=scalar forces
// the scalar one; avx2 machines run the scalar one too).
const char* dualbin_cpu_isa();

}  // namespace cpu
}  // namespace quantkit
