// CPU ops of the int-k format (k-bit codes, one fp32 scale per row; quantkit/formats/intk.py):
// checks and dispatch for torch.ops.quantkit.intk_dequantize / intk_linear; the kernels are
// in csrc/cpu/intk_linear.cpp, the shared glue in csrc/ops/common.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "cpu/intk_gemv.h"
#include "cpu/intk_linear.h"
#include "ops/common.h"

namespace quantkit {
namespace ops {
namespace {

// Largest m that intk_linear runs on the decode-and-dot kernel; above it the weight is
// decoded into fp32 row tiles and MKL sgemm runs (the dot kernel re-reads x per weight row
// and cannot block like a GEMM). QUANTKIT_INTK_GEMM_M=<m> overrides (tests, benchmarks).
int64_t intk_gemm_threshold() {
  static const int64_t v = env_int64("QUANTKIT_INTK_GEMM_M", 8);
  return v;
}

cpu::IntKWeight make_intk(const at::Tensor& packed, const at::Tensor& scale, int64_t bits, double offset,
                          int64_t rows, int64_t cols, const char* op) {
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must be 1..8, got ", bits);
  TORCH_CHECK(rows >= 0 && cols >= 0, op, ": weight shape n=", rows, ", k=", cols, " must be non-negative");
  const int64_t rb = (cols * bits + 7) / 8;
  TORCH_CHECK(packed.device().is_cpu() && scale.device().is_cpu(), op, ": CPU kernel got tensors on ",
              packed.device(), "/", scale.device());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(0) == rows &&
                  packed.size(1) == rb,
              op, ": packed must be uint8 [", rows, ", ", rb, "] for n=", rows, " x k=", cols, " at ", bits,
              " bits, got ", packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == rows, op, ": scale must be fp32 [", rows,
              "], got ", scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(packed.is_contiguous() && scale.is_contiguous(), op, ": packed and scale must be contiguous");
  cpu::IntKWeight w{};
  w.packed = packed.data_ptr<uint8_t>();
  w.scale = scale.data_ptr<float>();
  w.bits = static_cast<int>(bits);
  w.offset = static_cast<float>(offset);
  w.rows = rows;
  w.cols = cols;
  w.row_bytes = rb;
  return w;
}

at::Tensor intk_dequantize_cpu(const at::Tensor& packed, const at::Tensor& scale, int64_t bits, double offset,
                               int64_t rows, int64_t cols) {
  const cpu::IntKWeight w = make_intk(packed, scale, bits, offset, rows, cols, "intk_dequantize");
  at::Tensor out = at::empty({rows, cols}, packed.options().dtype(at::kFloat));
  if (rows * cols > 0) cpu::intk_dequantize_rows(w, 0, rows, out.data_ptr<float>());
  return out;
}

// y = (x.float() @ W.T + bias.float()).to(x.dtype): bf16/fp16 x is widened to fp32 first, so
// every dtype computes what the reference computes (up to summation order).
at::Tensor intk_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t bits,
                           double offset, int64_t out_features, int64_t in_features,
                           const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "intk_linear";
  const int64_t n = out_features, k = in_features;
  check_x(x, n, k, op);
  to_dtype(x, op, "x");  // only checks: x is widened to fp32 below
  const cpu::IntKWeight w = make_intk(packed, scale, bits, offset, n, k, op);
  const int64_t m = rows_of(x, k);
  const std::vector<int64_t> out_shape = out_shape_of(x, n);
  check_bias(bias, n, m, k, op);
  // The bias of any dtype, widened to fp32 [n] once (intk_gemm_small reads it as fp32).
  const std::optional<at::Tensor> bf =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous().reshape({n})) : std::nullopt;
  if (m == 0 || n == 0 || k == 0) return empty_product_linear(x, out_shape, bf);
  const at::Tensor x2 = x.reshape({m, k}).to(at::kFloat).contiguous();
  at::Tensor y;
  if (m <= intk_gemm_threshold()) {
    y = at::empty({m, n}, x2.options());
    const float* bp = bf.has_value() ? bf->data_ptr<float>() : nullptr;
    if (cpu::intk_gemv_supported(w)) cpu::intk_gemv_avx512(w, x2.data_ptr<float>(), m, bp, y.data_ptr<float>());
    else cpu::intk_gemm_small(w, x2.data_ptr<float>(), m, bp, y.data_ptr<float>());
  } else {
    y = tiled_dequant_mm(x2, n, bf, [&](int64_t n0, int64_t n1, void* dst) {
      cpu::intk_dequantize_rows(w, n0, n1, static_cast<float*>(dst));
    });
  }
  return y.to(x.scalar_type()).reshape(out_shape);
}

// Rows ids of the table [rows, cols] (one per token), bit-identical to intk_dequantize.
at::Tensor intk_embedding_cpu(const at::Tensor& ids, const at::Tensor& packed, const at::Tensor& scale, int64_t bits,
                              double offset, int64_t rows, int64_t cols) {
  constexpr const char* op = "intk_embedding";
  const cpu::IntKWeight w = make_intk(packed, scale, bits, offset, rows, cols, op);
  return gather_rows(ids, rows, cols, op, [&](int64_t r, float* dst) { cpu::intk_dequantize_rows(w, r, r + 1, dst); });
}

}  // namespace
}  // namespace ops
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("intk_dequantize", &quantkit::ops::intk_dequantize_cpu);
  m.impl("intk_linear", &quantkit::ops::intk_linear_cpu);
  m.impl("intk_embedding", &quantkit::ops::intk_embedding_cpu);
}
