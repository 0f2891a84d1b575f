// int-k (k = 1..8 bit codes, one fp32 scale per output row) CPU kernels: raw-pointer interface.
//
// Layout (quantkit/formats/intk.py): row r of the packed weight is a little-endian bitstream of
// row_bytes = ceil(cols * bits / 8) bytes; code c occupies bits [c*bits, c*bits + bits), bit p
// being bit (p % 8) of byte p / 8. W[r, c] = (code - offset) * scale[r], in fp32.
// Free of torch headers like lut4_linear.h; csrc/ops/intk_ops.cpp owns tensors, checks and registration.
#pragma once

#include <cstdint>

namespace quantkit {
namespace cpu {

struct IntKWeight {
  const uint8_t* packed;  // uint8 [rows, row_bytes]
  const float* scale;     // fp32 [rows]
  int bits;               // 1..8
  float offset;           // subtracted from each code (a multiple of 0.5)
  int64_t rows;           // N = out_features
  int64_t cols;           // K = in_features
  int64_t row_bytes;      // ceil(cols * bits / 8)
};

// Rows [r0, r1) of W into out (fp32 [r1 - r0, cols]), bit-identical to the reference.
void intk_dequantize_rows(const IntKWeight& w, int64_t r0, int64_t r1, float* out);

// y[i, n] = sum_k x[i, k] * W[n, k] (+ bias[n]), fp32 x / y / bias, for small m: each weight
// row is decoded once into a buffer and dotted with every x row (fp32 accumulation).
void intk_gemm_small(const IntKWeight& w,  // packed weight [N, K]
                     const float* x,       // fp32 [m, K] contiguous
                     int64_t m,            // rows of x
                     const float* bias,    // fp32 [N] or nullptr
                     float* y);            // fp32 [m, N] contiguous

}  // namespace cpu
}  // namespace quantkit
