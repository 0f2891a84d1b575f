// CUDA kernels for the nf4/fp4 ("lut4") format: host launchers, torch-free.
//
// The weight is exactly what quantkit/formats/lut4.py stores (bitsandbytes' layout):
//   W [n, k] row-major, flattened; element e = row * k + col.
//   packed[e / 2] holds element e in its HIGH nibble when e is even, LOW nibble when odd.
//   value(e) = code[nibble(e)] * absmax(e / blocksize)
//   absmax(b) = absmax_f32[b], or with double quant
//             = absmax_code[absmax_u8[b]] * absmax_scale[b / absmax_blocksize] + absmax_offset
//               (a separate fp32 multiply and add, rounded like the reference: never an FMA).
// Blocks run over the flattened weight, so a block may span two rows when k % blocksize != 0.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace quantkit {
namespace cuda {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };  // activation / output element type

struct Lut4Weight {
  const uint8_t* packed = nullptr;        // [(n*k+1)/2] two 4-bit codes per byte, even element high
  const float* absmax_f32 = nullptr;      // [nb] fp32 absmax (no double quant), else nullptr
  const uint8_t* absmax_u8 = nullptr;     // [nb] 8-bit absmax codes (double quant), else nullptr
  const float* absmax_code = nullptr;     // [256] fp32 table for absmax_u8
  const float* absmax_scale = nullptr;    // [ceil(nb/absmax_blocksize)] fp32
  const float* code = nullptr;            // [16] fp32 nf4 or fp4 table
  float absmax_offset = 0.f;              // added after the scale (double quant)
  int64_t blocksize = 64;                 // weights per absmax, > 0
  int64_t absmax_blocksize = 256;         // absmax values per absmax_scale, > 0 with double quant
  int64_t n = 0;                          // out_features (rows of W)
  int64_t k = 0;                          // in_features (columns of W)
};

// Largest activation row count the fused GEMV handles; larger batches dequantize + GEMM.
constexpr int64_t kLut4GemvMaxM = 8;

// y[m, n] = x[m, k] @ W^T + bias, fp32 accumulation, one rounding to `dt` at the end.
//   x    [m, k] contiguous, element type dt;  y [m, n] contiguous, element type dt
//   bias [n] fp32 or nullptr
// Requires 1 <= m <= kLut4GemvMaxM. Uses 16-byte loads when k % 32 == 0 and packed, x are
// 16-byte aligned; otherwise a per-element path (same result up to summation order).
cudaError_t lut4_gemv(const Lut4Weight& w, const void* x, DType dt, int64_t m, const float* bias, void* y,
                      cudaStream_t stream);

// out[n, k] = dequantized W, element type dt (the fp32 product code*absmax, then one
// round-to-nearest-even to dt: bit-identical to the reference's W.to(dt)).
cudaError_t lut4_dequantize(const Lut4Weight& w, void* out, DType dt, cudaStream_t stream);

}  // namespace cuda
}  // namespace quantkit
