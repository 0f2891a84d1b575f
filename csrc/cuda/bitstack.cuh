// CUDA kernel for the BitStack format: host launcher, torch-free.
//
// Weight (quantkit/formats/bitstack.py): b residual blocks of an [m, n] weight,
//   signs uint8 [b, m, nbytes], nbytes = ceil(n/8): column c of row r is bit (7 - c%8) of byte
//         c/8 (MSB first), 1 = +1, 0 = -1, padding bits 0
//   u     fp16  [b, m, k]   or int8 [b, m, k] with scale fp32 [b, k]
//   v     fp16  [b, k, n]   or int8 [b, k, n]
// W = sum_i S_i (.) (u_i v_i); with int8 factors u_i v_i = sum_j scale[i, j] u_i[:, j] v_i[j, :].
// The kernel never forms W (see bitstack_gemv.cu).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace quantkit {
namespace cuda {

// Ranks with a compiled kernel (the per-row accumulator is k registers).
constexpr bool bitstack_rank_supported(int64_t k) { return k == 4 || k == 8 || k == 16 || k == 32; }

// y[t, r] = sum_c W[r, c] x[t, c] + bias[r] for t < rows, fp32 in and out.
//   x [rows, n] fp32 contiguous; y [rows, m] fp32 contiguous; bias [m] fp32 or nullptr.
// Returns cudaErrorInvalidValue for an unsupported rank or bad sizes (m, n, k, rows named
// by the caller), else the launch status.
cudaError_t bitstack_gemv(const uint8_t* signs,  // [b, m, nbytes]
                          const __half* u,       // [b, m, k]
                          const __half* v,       // [b, k, n]
                          const float* x,        // [rows, n]
                          const float* bias,     // [m] or nullptr
                          float* y,              // [rows, m]
                          int64_t b, int64_t m, int64_t n, int64_t k, int64_t rows, cudaStream_t stream);

// The same with int8 factors and their scale [b, k] (fp32).
cudaError_t bitstack_gemv_int8(const uint8_t* signs,  // [b, m, nbytes]
                               const int8_t* u,       // [b, m, k]
                               const int8_t* v,       // [b, k, n]
                               const float* scale,    // [b, k]
                               const float* x,        // [rows, n]
                               const float* bias,     // [m] or nullptr
                               float* y,              // [rows, m]
                               int64_t b, int64_t m, int64_t n, int64_t k, int64_t rows, cudaStream_t stream);

}  // namespace cuda
}  // namespace quantkit
