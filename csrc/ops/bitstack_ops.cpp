// CPU ops of the BitStack format (sign planes + low-rank fp16 or int8 factors; quantkit/formats/bitstack.py):
// checks and dispatch for torch.ops.quantkit.bitstack_dequantize / bitstack_linear; the
// kernels are in csrc/cpu/bitstack_linear.cpp, the shared glue in csrc/ops/common.h.
// BitStack names the weight m (out) x n (in), unlike the other formats' n x k.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "cpu/bitstack_linear.h"
#include "ops/common.h"

namespace quantkit {
namespace ops {
namespace {

// Largest number of x rows run on the table-lookup kernel (no dense W); above it the
// weight is rebuilt once (u_i v_i by MKL, signs applied) and a GEMM runs. Measured in
// docs/benchmarks.md (BitStack section); QUANTKIT_BITSTACK_GEMM_M=<m> overrides.
int64_t bitstack_gemm_threshold() {
  static const int64_t v = env_int64("QUANTKIT_BITSTACK_GEMM_M", 4);
  return v;
}

cpu::BitStackWeight make_bitstack(const at::Tensor& signs, const at::Tensor& u, const at::Tensor& v,
                                  const std::optional<at::Tensor>& scale, const char* op) {
  TORCH_CHECK(signs.dim() == 3 && u.dim() == 3 && v.dim() == 3, op,
              ": signs, u, v must be 3-D [b, m, ceil(n/8)], [b, m, k], [b, k, n]; got ", signs.sizes(), ", ",
              u.sizes(), ", ", v.sizes());
  const bool int8 = scale.has_value();
  TORCH_CHECK(signs.scalar_type() == at::kByte &&
                  (int8 ? (u.scalar_type() == at::kChar && v.scalar_type() == at::kChar)
                        : (u.scalar_type() == at::kHalf && v.scalar_type() == at::kHalf)),
              op, ": signs must be uint8 and u, v float16 (no scale) or int8 (with an fp32 scale); got ",
              signs.scalar_type(), ", ", u.scalar_type(), ", ", v.scalar_type(), int8 ? " with a scale" : " without a scale");
  TORCH_CHECK(signs.device().is_cpu() && u.device().is_cpu() && v.device().is_cpu(), op,
              ": CPU kernel got tensors on ", signs.device(), "/", u.device(), "/", v.device());
  const int64_t b = u.size(0), m = u.size(1), k = u.size(2), n = v.size(2);
  TORCH_CHECK(b >= 1 && signs.size(0) == b && v.size(0) == b, op, ": block counts differ: signs ", signs.size(0),
              ", u ", b, ", v ", v.size(0));
  TORCH_CHECK(v.size(1) == k, op, ": u has rank k=", k, " but v is ", v.sizes());
  TORCH_CHECK(signs.size(1) == m && signs.size(2) == (n + 7) / 8, op, ": signs is ", signs.sizes(), " but an m=", m,
              " x n=", n, " weight needs [", b, ", ", m, ", ", (n + 7) / 8, "]");
  TORCH_CHECK(signs.is_contiguous() && u.is_contiguous() && v.is_contiguous(), op,
              ": signs, u and v must be contiguous");
  cpu::BitStackWeight w{};
  w.signs = signs.data_ptr<uint8_t>();
  if (int8) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->dim() == 2 && scale->size(0) == b &&
                    scale->size(1) == k && scale->device().is_cpu() && scale->is_contiguous(),
                op, ": scale must be a contiguous CPU fp32 [", b, ", ", k, "], got ", scale->scalar_type(), " ",
                scale->sizes());
    w.u8 = u.data_ptr<int8_t>();
    w.v8 = v.data_ptr<int8_t>();
    w.scale = scale->data_ptr<float>();
  } else {
    w.u = reinterpret_cast<const uint16_t*>(u.data_ptr<at::Half>());
    w.v = reinterpret_cast<const uint16_t*>(v.data_ptr<at::Half>());
  }
  w.b = b;
  w.m = m;
  w.n = n;
  w.k = k;
  return w;
}

at::Tensor bitstack_dequantize_cpu(const at::Tensor& signs, const at::Tensor& u, const at::Tensor& v,
                                   const std::optional<at::Tensor>& scale) {
  const cpu::BitStackWeight w = make_bitstack(signs, u, v, scale, "bitstack_dequantize");
  at::Tensor out = at::empty({w.m, w.n}, u.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  for (int64_t i = 0; i < w.b; ++i) {
    at::Tensor ui = u[i].to(at::kFloat);
    if (scale.has_value()) ui = ui * (*scale)[i].unsqueeze(0);  // int8 codes times their component scale
    const at::Tensor uv = at::mm(ui, v[i].to(at::kFloat)).contiguous();  // MKL, [m, n]
    cpu::bitstack_apply_signs(w.signs + i * w.m * ((w.n + 7) / 8), uv.data_ptr<float>(), w.m, w.n, i == 0,
                              out.data_ptr<float>());
  }
  return out;
}

at::Tensor bitstack_linear_cpu(const at::Tensor& x, const at::Tensor& signs, const at::Tensor& u, const at::Tensor& v,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale) {
  constexpr const char* op = "bitstack_linear";
  const cpu::BitStackWeight w = make_bitstack(signs, u, v, scale, op);
  check_x(x, w.m, w.n, op, "m", "n");
  const DType xt = to_dtype(x, op, "x");
  const int64_t rows = rows_of(x, w.n);
  const std::vector<int64_t> out_shape = out_shape_of(x, w.m);
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == w.m && bias->device().is_cpu(), op, ": bias has ", bias->numel(),
                " entries but m=", w.m);
  }
  const DType bt = bias_dtype(bias, op);
  if (rows == 0 || w.m == 0 || w.n == 0 || rows > bitstack_gemm_threshold()) {
    // Prefill / large batch: rebuild W once and let MKL run the GEMM (the lookup kernel
    // rebuilds its tables per row of x, so its cost grows with rows).
    at::Tensor wd = bitstack_dequantize_cpu(signs, u, v, scale);
    at::Tensor y = at::matmul(x.to(at::kFloat), wd.t());
    if (bias.has_value()) y = y + bias->to(at::kFloat);
    return y.to(x.scalar_type());
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(out_shape, x.options());
  at::Tensor bc;
  cpu::bitstack_gemv(w, xc.data_ptr(), xt, rows, bias_data(bias, bc), bt, y.data_ptr());
  return y;
}

}  // namespace
}  // namespace ops
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("bitstack_dequantize", &quantkit::ops::bitstack_dequantize_cpu);
  m.impl("bitstack_linear", &quantkit::ops::bitstack_linear_cpu);
}
