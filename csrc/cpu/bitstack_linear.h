// BitStack CPU kernels: raw-pointer interface (csrc/ops/bitstack_ops.cpp owns tensors, checks, registration).
//
// Weight layout (quantkit/formats/bitstack.py): b residual blocks of an [m, n] weight,
//   signs uint8 [b, m, nbytes], nbytes = ceil(n/8): column c of row r is bit (7 - c%8) of
//         byte c/8 (MSB first), 1 = +1, 0 = -1; padding bits are 0
//   u     fp16  [b, m, k]   or int8 [b, m, k] with scale fp32 [b, k]
//   v     fp16  [b, k, n]   or int8 [b, k, n]
// W = sum_i S_i (.) (u_i v_i); with int8 factors u_i v_i = sum_j scale[i, j] u_i[:, j] v_i[j, :].
#pragma once

#include <cstdint>

#include "cpu/lut4_linear.h"  // DType

namespace quantkit {
namespace cpu {

struct BitStackWeight {
  const uint8_t* signs;  // uint8 [b, m, nbytes]
  const uint16_t* u;     // fp16 bit patterns [b, m, k] (nullptr with int8 factors)
  const uint16_t* v;     // fp16 bit patterns [b, k, n] (nullptr with int8 factors)
  const int8_t* u8;      // int8 [b, m, k] (nullptr with fp16 factors)
  const int8_t* v8;      // int8 [b, k, n] (nullptr with fp16 factors)
  const float* scale;    // fp32 [b, k] for int8 factors, else nullptr
  int64_t b;             // blocks
  int64_t m;             // out_features (rows of W)
  int64_t n;             // in_features (columns of W)
  int64_t k;             // rank per block
};

// y[t, r] = sum_c W[r, c] x[t, c] + bias[r] for t < rows, WITHOUT forming W: per block
// Z = v_i (.) x (k x n), 16-entry tables of signed sums of 4 columns of Z, then every row
// is n/4 table lookups of k-vectors and one k-wide dot with u_i[r]. fp32 accumulation.
void bitstack_gemv(const BitStackWeight& w,  // packed blocks
                   const void* x,            // [rows, n] contiguous, type xt
                   DType xt,                 // dtype of x and y
                   int64_t rows,             // tokens (rows of x)
                   const void* bias,         // [m] of type bt, or nullptr
                   DType bt,                 // dtype of bias
                   void* y);                 // [rows, m] contiguous, type xt

// out (+)= S_i (.) uv for one block: out[r, c] = (first ? 0 : out[r, c]) +/- uv[r, c].
void bitstack_apply_signs(const uint8_t* signs,  // uint8 [m, nbytes] of block i
                          const float* uv,       // fp32 [m, n] = u_i v_i
                          int64_t m, int64_t n,  // weight shape
                          bool first,            // overwrite instead of accumulate
                          float* out);           // fp32 [m, n]

// Which vector ISA the BitStack kernels use ("avx512", "avx2" or "scalar"; QUANTKIT_CPU_ISA
// lowers it, like the lut4 kernels).
const char* bitstack_cpu_isa();

}  // namespace cpu
}  // namespace quantkit
