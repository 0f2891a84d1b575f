// CUDA kernels for the dualbin (DB-LLM dual binarization) format: host launchers, torch-free.
//
// The weight is exactly what quantkit/formats/dualbin.py stores:
//   W [n, k] = alpha1[row, g] * b1 + alpha2[row, g] * b2,  g = col / group,  b1, b2 in {0, 1}
//   plane1/plane2: uint8 [n, row_bytes], row_bytes = G * group / 8, G = ceil(k / group);
//                  element col of a row is bit (col % 8) of byte col / 8 (LSB first), so a
//                  group of 64 is one little-endian uint64; bits past k are 0.
//   alpha1/alpha2: fp16 [n, G] (passed as raw uint16 bits).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace quantkit {
namespace cuda_dualbin {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };  // activation / output element type

struct DualBinWeight {
  const uint8_t* plane1 = nullptr;   // [n, row_bytes]
  const uint8_t* plane2 = nullptr;   // [n, row_bytes]
  const uint16_t* alpha1 = nullptr;  // [n, G] fp16 bits
  const uint16_t* alpha2 = nullptr;  // [n, G] fp16 bits
  int64_t group = 64;                // weights per scale pair along k (32, 64, 128 or 256)
  int64_t n = 0;                     // out_features
  int64_t k = 0;                     // in_features
};

// Largest activation row count of the GEMV; larger batches dequantize + GEMM (cuBLAS).
constexpr int64_t kDualBinGemvMaxM = 8;

// y[m, n] = x[m, k] @ W^T + bias, fp32 accumulation, one rounding to `dt`.
//   x [m, k] contiguous (dt), y [m, n] contiguous (dt), bias [n] fp32 or nullptr.
// Requires group == 64 and 1 <= m <= kDualBinGemvMaxM (cudaErrorInvalidValue otherwise).
cudaError_t dualbin_gemv(const DualBinWeight& w, const void* x, DType dt, int64_t m, const float* bias, void* y,
                         cudaStream_t stream);

// out[n, k] fp32 = dequantized W (any group), bit-identical to the reference
// (float(a1) * b1 + float(a2) * b2).
cudaError_t dualbin_dequantize(const DualBinWeight& w, float* out, cudaStream_t stream);

}  // namespace cuda_dualbin
}  // namespace quantkit
