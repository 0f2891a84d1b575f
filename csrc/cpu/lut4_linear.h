// lut4 (nf4/fp4, bitsandbytes layout) CPU kernels: raw-pointer interface.
//
// Kept free of <torch/extension.h> on purpose: the kernel translation unit only needs
// ATen/Parallel.h, so it compiles in a few seconds instead of ~25 s. csrc/ops/lut4_ops.cpp
// owns the tensors, the checks and the dispatcher registration.
#pragma once

#include <cstdint>

namespace quantkit {
namespace cpu {

// Element type of activations / outputs / bias handled by the kernels.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// One packed 4-bit weight [rows, cols]; everything the decode needs, no ownership.
struct Lut4Weight {
  const uint8_t* packed;        // uint8 [(rows*cols+1)/2]: element 2i high nibble, 2i+1 low
  const float* absmax_f32;      // fp32 [nb] block scales, or nullptr when double-quantized
  const uint8_t* absmax_u8;     // uint8 [nb] double-quantized scales, or nullptr
  const float* code;            // fp32 [16] lookup table (nf4 or fp4 values in [-1, 1])
  const float* absmax_code;     // fp32 [256] nested table (double quant only)
  const float* absmax_scale;    // fp32 [ceil(nb/absmax_blocksize)] nested scales (double quant only)
  float absmax_offset;          // added after the nested decode (mean of the fp32 absmax)
  int64_t absmax_blocksize;     // blocks per nested scale (256 in bnb)
  int64_t blocksize;            // elements per block, over the row-major flattened weight
  int64_t rows;                 // N = out_features
  int64_t cols;                 // K = in_features
  // Derived by the kernel entry points (callers leave them): log2 of blocksize and of
  // absmax_blocksize, or -1 when not a power of two. Block indices are then shifts, not
  // 64-bit divisions (~20+ cycles, once per block of 64 weights in the GEMV hot loop).
  int blocksize_log2 = -1;
  int absmax_blocksize_log2 = -1;
};

// out[r, c] = code[idx] * absmax[block] in fp32, bit-identical to the reference.
void lut4_dequantize(const Lut4Weight& w,  // packed weight [rows, cols]
                     float* out);          // fp32 [rows, cols], written fully

// Rows [r0, r1) of the dequantized weight into out (fp32 [r1 - r0, cols]); same values.
void lut4_dequantize_rows(const Lut4Weight& w,  // packed weight [rows, cols]
                          int64_t r0,           // first row
                          int64_t r1,           // end row
                          float* out);          // fp32 [r1 - r0, cols]

// Rows [r0, r1) of the dequantized weight rounded to out_t (BF16 or F16; F32 is
// lut4_dequantize_rows): each value is the fp32 decode above converted exactly as
// Tensor.to(dtype) does (round to nearest even, denormals kept), on every ISA.
void lut4_dequantize_rows_to(const Lut4Weight& w,  // packed weight [rows, cols]
                             int64_t r0,           // first row
                             int64_t r1,           // end row
                             DType out_t,          // BF16, F16 (or F32)
                             void* out);           // [r1 - r0, cols] of type out_t

// y[i, n] = sum_k x[i, k] * W[n, k] + bias[n], fp32 accumulation, for small m (decodes
// the packed weight on the fly; one pass over the weight bytes per group of x rows).
void lut4_gemm_small(const Lut4Weight& w,  // packed weight [N, K]
                     const void* x,        // [m, K] contiguous activations of type xt
                     DType xt,             // dtype of x and of y
                     int64_t m,            // rows of x
                     const void* bias,     // [N] of type bt, or nullptr
                     DType bt,             // dtype of bias
                     void* y);             // [m, N] contiguous output of type xt

// Which vector ISA the kernels picked at runtime ("avx512", "avx2" or "scalar").
// QUANTKIT_CPU_ISA=avx2|scalar forces a lower one (used by the tests).
// y [m, sum_j N_j] = [x @ W_0.T + b_0 | x @ W_1.T + b_1 | ...] for nw weights sharing K (a
// fused q/k/v or gate/up projection at small m), in one parallel region and with x
// prepared once; every output is bit-identical to lut4_gemm_small on that weight alone.
// Returns false, writing nothing, where the fused fast path does not apply (scalar ISA,
// K % 32 != 0, blocksize % 32 != 0, K differing between weights): call them one by one.
bool lut4_gemm_small_multi(const Lut4Weight* ws,        // nw packed weights [N_j, K]
                           int64_t nw,                   // number of weights
                           const void* x,                // [m, K] contiguous, type xt
                           DType xt,                     // dtype of x and y
                           int64_t m,                    // rows of x
                           const void* const* biases,    // nw pointers ([N_j] of type bts[j], or nullptr)
                           const DType* bts,             // nw bias dtypes
                           void* y);                     // [m, sum N_j] contiguous, type xt

const char* lut4_cpu_isa();

}  // namespace cpu
}  // namespace quantkit
