// CPU ops of the dualbin format (DB-LLM flexible dual binarization; quantkit/formats/dualbin.py):
// checks and dispatch for torch.ops.quantkit.dualbin_dequantize / dualbin_linear; the kernels
// are in csrc/cpu/dualbin_linear.cpp, the shared glue in csrc/ops/common.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "cpu/dualbin_linear.h"
#include "ops/common.h"

namespace quantkit {
namespace ops {
namespace {

cpu::DualBinWeight make_dualbin(const at::Tensor& plane1, const at::Tensor& plane2, const at::Tensor& alpha1,
                                const at::Tensor& alpha2, int64_t group, int64_t rows, int64_t cols,
                                const char* op) {
  TORCH_CHECK(rows >= 0 && cols >= 0, op, ": weight shape n=", rows, ", k=", cols, " must be non-negative");
  TORCH_CHECK(group > 0 && group % 16 == 0, op, ": group must be a positive multiple of 16, got ", group);
  const int64_t g = (cols + group - 1) / group, row_bytes = g * group / 8;
  for (const at::Tensor* p : {&plane1, &plane2}) {
    TORCH_CHECK(p->device().is_cpu() && p->scalar_type() == at::kByte && p->is_contiguous(), op,
                ": planes must be contiguous CPU uint8, got ", p->scalar_type(), " on ", p->device());
    TORCH_CHECK(p->dim() == 2 && p->size(0) == rows && p->size(1) == row_bytes, op, ": plane is ", p->sizes(),
                " but n=", rows, " x k=", cols, " at group ", group, " needs [", rows, ", ", row_bytes, "]");
  }
  for (const at::Tensor* a : {&alpha1, &alpha2}) {
    TORCH_CHECK(a->device().is_cpu() && a->scalar_type() == at::kHalf && a->is_contiguous(), op,
                ": alpha1/alpha2 must be contiguous CPU float16, got ", a->scalar_type(), " on ", a->device());
    TORCH_CHECK(a->dim() == 2 && a->size(0) == rows && a->size(1) == g, op, ": alpha is ", a->sizes(),
                " but n=", rows, " x k=", cols, " at group ", group, " needs [", rows, ", ", g, "]");
  }
  cpu::DualBinWeight w{};
  w.plane1 = plane1.data_ptr<uint8_t>();
  w.plane2 = plane2.data_ptr<uint8_t>();
  w.alpha1 = reinterpret_cast<const uint16_t*>(alpha1.data_ptr<at::Half>());
  w.alpha2 = reinterpret_cast<const uint16_t*>(alpha2.data_ptr<at::Half>());
  w.group = group;
  w.rows = rows;
  w.cols = cols;
  w.groups = g;
  w.row_bytes = row_bytes;
  return w;
}

at::Tensor dualbin_dequantize_cpu(const at::Tensor& plane1, const at::Tensor& plane2, const at::Tensor& alpha1,
                                  const at::Tensor& alpha2, int64_t group, int64_t rows, int64_t cols) {
  const cpu::DualBinWeight w = make_dualbin(plane1, plane2, alpha1, alpha2, group, rows, cols, "dualbin_dequantize");
  at::Tensor out = at::empty({rows, cols}, plane1.options().dtype(at::kFloat));
  if (rows > 0 && cols > 0) cpu::dualbin_dequantize_rows(w, 0, rows, out.data_ptr<float>());
  return out;
}

// Largest m that runs the masked-add kernel; above it the weight is dequantized to fp32 in
// row tiles (AVX-512 blends) and MKL sgemm runs. The masked-add kernel costs two masked adds
// per 16 weights per x row, so its time grows linearly with m, while dequant + sgemm pays a
// fixed decode. Measured 2026-11-23 (1 thread; the shared VM's 1-min load was ~8.8, so
// +-30 %), ms, masked-add vs dequant+sgemm:
//   4096x4096  m=2 2.0 vs 43   m=4 22 vs 59   m=8 33 vs 70   m=12 60 vs 86   m=16 75 vs 76
//   576x1536   m=2 0.13 vs 0.30   m=8 0.42 vs 0.56   m=12 0.78 vs 0.67   m=16 1.12 vs 0.50
//   1536x576   m=2 0.11 vs 0.30   m=8 0.33 vs 0.55   m=12 0.60 vs 0.64   m=16 0.64 vs 0.58
// QUANTKIT_DUALBIN_GEMM_M=<m> overrides (tests use 0 to force the GEMM path).
int64_t dualbin_gemm_threshold() {
  static const int64_t v = env_int64("QUANTKIT_DUALBIN_GEMM_M", 8);
  return v;
}

at::Tensor dualbin_linear_cpu(const at::Tensor& x, const at::Tensor& plane1, const at::Tensor& plane2,
                              const at::Tensor& alpha1, const at::Tensor& alpha2, int64_t group,
                              int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "dualbin_linear";
  const int64_t n = out_features, k = in_features;
  check_x(x, n, k, op);
  const DType xt = to_dtype(x, op, "x");
  const cpu::DualBinWeight w = make_dualbin(plane1, plane2, alpha1, alpha2, group, n, k, op);
  const int64_t m = rows_of(x, k);
  const std::vector<int64_t> out_shape = out_shape_of(x, n);
  check_bias(bias, n, m, k, op);
  const DType bt = bias_dtype(bias, op);
  if (m == 0 || n == 0 || k == 0) return empty_product_linear(x, out_shape, bias);
  const at::Tensor xc = x.contiguous();
  if (m > dualbin_gemm_threshold()) {
    // fp32 row tiles of W and MKL sgemm; same values as the reference up to summation order,
    // for every x dtype (x is computed in fp32, as the reference does).
    const at::Tensor y = tiled_dequant_mm(xc.reshape({m, k}).to(at::kFloat), n, bias,
                                          [&](int64_t n0, int64_t n1, void* dst) {
                                            cpu::dualbin_dequantize_rows(w, n0, n1, static_cast<float*>(dst));
                                          });
    return y.to(x.scalar_type()).reshape(out_shape);
  }
  at::Tensor y = at::empty(out_shape, x.options());
  at::Tensor bc;
  cpu::dualbin_gemm_small(w, xc.data_ptr(), xt, m, bias_data(bias, bc), bt, y.data_ptr());
  return y;
}

}  // namespace
}  // namespace ops
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("dualbin_dequantize", &quantkit::ops::dualbin_dequantize_cpu);
  m.impl("dualbin_linear", &quantkit::ops::dualbin_linear_cpu);
}
