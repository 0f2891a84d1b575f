// Shared glue of the per-format CPU ops; see common.h.
#include "ops/common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>

namespace quantkit {
namespace ops {

DType to_dtype(const at::Tensor& t, const char* op, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, op, ": ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

int64_t env_int64(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoll(v) : fallback;
}

void check_x(const at::Tensor& x, int64_t out, int64_t k, const char* op, const char* out_name,
             const char* in_name) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, op, ": x has last dim ", x.dim() ? x.size(-1) : 0,
              " but the weight is ", out_name, "=", out, " x ", in_name, "=", k);
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU kernel got x on ", x.device());
}

void check_bias(const std::optional<at::Tensor>& bias, int64_t n, int64_t m, int64_t k, const char* op) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->numel() == n && bias->device().is_cpu(), op, ": bias has ", bias->numel(), " entries but n=", n,
              " (m=", m, ", k=", k, ")");
}

DType bias_dtype(const std::optional<at::Tensor>& bias, const char* op) {
  return bias.has_value() ? to_dtype(*bias, op, "bias") : DType::F32;
}

std::vector<int64_t> out_shape_of(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

at::Tensor empty_product_linear(const at::Tensor& x, const std::vector<int64_t>& out_shape,
                                const std::optional<at::Tensor>& bias) {
  at::Tensor y = at::zeros(out_shape, x.options().dtype(at::kFloat));
  if (bias.has_value() && y.numel() > 0) y = y + bias->to(at::kFloat);
  return y.to(x.scalar_type());
}

at::Tensor tiled_dequant_mm(const at::Tensor& x2, int64_t n, const std::optional<at::Tensor>& bias,
                            DequantRows dequant_rows) {
  const int64_t m = x2.size(0), k = x2.size(1);
  const at::ScalarType st = x2.scalar_type();
  // 8 MB tiles (measured for lut4: 4 and 16 MB within ~10 %; 32 MB tiles are served by a
  // fresh mmap each call again).
  const int64_t tile = std::min<int64_t>(n, std::max<int64_t>(64, (int64_t{8} << 20) / (x2.element_size() * k)));
  at::Tensor wbuf = at::empty({tile, k}, x2.options());
  at::Tensor y = at::empty({m, n}, x2.options());
  // Half compute dtype: a bias of that dtype rides in the GEMM (addmm rounds once).
  const bool fuse_bias = st != at::kFloat && bias.has_value() && bias->scalar_type() == st;
  const at::Tensor bc = fuse_bias ? bias->contiguous().reshape({n}) : at::Tensor();
  for (int64_t n0 = 0; n0 < n; n0 += tile) {
    const int64_t nt = std::min(tile, n - n0);
    at::Tensor wt = wbuf.narrow(0, 0, nt);
    dequant_rows(n0, n0 + nt, wt.data_ptr());
    at::Tensor yt = y.narrow(1, n0, nt);  // strided [m, nt] view: BLAS writes it with ldc = n
    if (fuse_bias) at::addmm_out(yt, bc.narrow(0, n0, nt), x2, wt.t());
    else at::mm_out(yt, x2, wt.t());
  }
  if (bias.has_value() && !fuse_bias) {
    if (st == at::kFloat) y.add_(bias->to(at::kFloat));
    else y = (y.to(at::kFloat) + bias->to(at::kFloat)).to(st);
  }
  return y;
}

at::Tensor gather_rows(const at::Tensor& ids, int64_t rows, int64_t cols, const char* op, DecodeRow decode_row) {
  TORCH_CHECK(ids.device().is_cpu(), op, ": ids must be on the CPU, got ", ids.device());
  TORCH_CHECK(at::isIntegralType(ids.scalar_type(), /*includeBool=*/false), op, ": ids must be an integer tensor, got ",
              ids.scalar_type());
  const at::Tensor flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t m = flat.numel();
  const int64_t* id = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i)  // checked before any work: a bad id leaves nothing half-written
    TORCH_CHECK_INDEX(id[i] >= 0 && id[i] < rows, "token id ", id[i], " is outside the embedding table of ", rows,
                      " rows");
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(cols);
  at::Tensor out = at::empty(shape, flat.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  // one decoded row per token; a prompt of a few hundred tokens splits across the threads
  at::parallel_for(0, m, 16, [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i) decode_row(id[i], dst + i * cols);
  });
  return out;
}

const void* bias_data(const std::optional<at::Tensor>& bias, at::Tensor& keep) {
  if (!bias.has_value()) return nullptr;
  keep = bias->contiguous();
  return keep.data_ptr();
}

}  // namespace ops
}  // namespace quantkit
