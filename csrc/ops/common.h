// Glue shared by the per-format CPU op files in csrc/ops/ (one <format>_ops.cpp per packed
// format, each with its own TORCH_LIBRARY_IMPL(quantkit, CPU, m) block).
//
// What lives here is what every <format>_linear_cpu repeats: the dtype mapping, the env
// reader behind the *_GEMM_M thresholds, the checks on x and bias, the result for shapes
// whose product is empty, and the "dequantize row tiles into one reused buffer, then a
// library GEMM per tile" path used above each format's threshold. A format file keeps only
// its weight checks (make_<format>), its thresholds and the calls into csrc/cpu/.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/lut4_linear.h"  // cpu::DType

namespace quantkit {
namespace ops {

using cpu::DType;

// DType of an activation / bias tensor (fp32, bf16 or fp16); anything else is a one-line
// error "<op>: <what> must be float32, bfloat16 or float16, got <dtype>".
DType to_dtype(const at::Tensor& t, const char* op, const char* what);

// The integer in environment variable `name`, or `fallback` when unset. Read per call:
// callers cache it in a function-local static (the thresholds are fixed per process).
int64_t env_int64(const char* name, int64_t fallback);

// Checks that x ends in dim k (the weight's in_features) and lives on the CPU. The error
// names the weight "<out_name>=<out> x <in_name>=<k>" in the op's own terms.
void check_x(const at::Tensor& x, int64_t out, int64_t k, const char* op, const char* out_name = "n",
             const char* in_name = "k");

// Checks that bias (when given) has n entries and lives on the CPU; m, k only for the message.
void check_bias(const std::optional<at::Tensor>& bias, int64_t n, int64_t m, int64_t k, const char* op);

// DType of bias (F32 when there is none); errors as to_dtype.
DType bias_dtype(const std::optional<at::Tensor>& bias, const char* op);

// Rows of x seen as [m, k] (0 when k == 0).
inline int64_t rows_of(const at::Tensor& x, int64_t k) { return k > 0 ? x.numel() / k : 0; }

// x's shape with the last dim replaced by n: the shape of y.
std::vector<int64_t> out_shape_of(const at::Tensor& x, int64_t n);

// y for m == 0, n == 0 or k == 0: zeros (+ bias widened to fp32), in x's dtype, as the
// reference computes it.
at::Tensor empty_product_linear(const at::Tensor& x, const std::vector<int64_t>& out_shape,
                                const std::optional<at::Tensor>& bias);

// Writes rows [n0, n1) of the dequantized weight into dst: [n1 - n0, k] contiguous, of the
// dtype tiled_dequant_mm computes in.
using DequantRows = c10::function_ref<void(int64_t n0, int64_t n1, void* dst)>;

// y [m, n] = x2 @ W.T (+ bias), W produced tile by tile: rows of W are dequantized into one
// reused buffer of ~8 MB (at least 64 rows, at most n) and each tile runs one library GEMM
// writing its [m, nt] column block of y. A full-size copy of an LLM weight would be a fresh
// mmap each call, whose page faults alone cost more than the GEMM.
//   x2: [m, k] CPU; its dtype is the compute dtype (the dtype of W tiles, GEMM and y).
//     fp32: MKL sgemm; bias (any dtype) is widened to fp32 and added afterwards.
//     bf16/fp16: oneDNN (AMX bf16 / AVX512-FP16, fp32 accumulation); a bias of x2's dtype
//       is fused into the GEMM (addmm, one rounding), any other bias is added in fp32 to
//       the rounded y and the sum rounded again.
//   Returns y [m, n] in x2's dtype; callers convert / reshape.
at::Tensor tiled_dequant_mm(const at::Tensor& x2, int64_t n, const std::optional<at::Tensor>& bias,
                            DequantRows dequant_rows);

// Writes row `row` of the dequantized table into dst (fp32 [cols]).
using DecodeRow = c10::function_ref<void(int64_t row, float* dst)>;

// out [*ids.shape, cols] fp32: row ids[i] of a packed [rows, cols] table, decoded by
// decode_row (an embedding lookup that never dequantizes the rows it does not gather).
// ids: any integer dtype on the CPU; an id outside [0, rows) is an IndexError naming it.
at::Tensor gather_rows(const at::Tensor& ids, int64_t rows, int64_t cols, const char* op, DecodeRow decode_row);

// Raw pointer to a contiguous copy of bias for the small-m kernels: keeps the copy alive in
// `keep`; nullptr when there is no bias.
const void* bias_data(const std::optional<at::Tensor>& bias, at::Tensor& keep);

}  // namespace ops
}  // namespace quantkit
