// CUDA impls of quantkit::dualbin_linear / quantkit::dualbin_dequantize (schemas in quantkit/_ops.py).
//
// group 64 with 1..8 activation rows runs the GEMV (csrc/cuda/dualbin_gemv.cu); everything
// else dequantizes W to fp32 with our kernel and runs cuBLAS (at::mm) on x.float(), the
// reference's arithmetic (a tensor-core path on a bf16/fp16 weight is not written yet).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cuda/dualbin.cuh"

namespace quantkit {
namespace {

using cuda_dualbin::DType;

cuda_dualbin::DualBinWeight make_dualbin_cuda(const at::Tensor& plane1, const at::Tensor& plane2,
                                              const at::Tensor& alpha1, const at::Tensor& alpha2, int64_t group,
                                              int64_t n, int64_t k, const char* op) {
  TORCH_CHECK(n >= 0 && k >= 0, op, ": weight shape n=", n, ", k=", k, " must be non-negative");
  TORCH_CHECK(group > 0 && group % 16 == 0, op, ": group must be a positive multiple of 16, got ", group);
  TORCH_CHECK(plane1.is_cuda(), op, ": CUDA kernel got plane1 on ", plane1.device());
  const int64_t g = (k + group - 1) / group, row_bytes = g * group / 8;
  for (const at::Tensor* p : {&plane1, &plane2}) {
    TORCH_CHECK(p->device() == plane1.device() && p->is_contiguous() && p->scalar_type() == at::kByte, op,
                ": planes must be contiguous uint8 on ", plane1.device());
    TORCH_CHECK(p->dim() == 2 && p->size(0) == n && p->size(1) == row_bytes, op, ": plane is ", p->sizes(),
                " but n=", n, " x k=", k, " at group ", group, " needs [", n, ", ", row_bytes, "]");
  }
  for (const at::Tensor* a : {&alpha1, &alpha2}) {
    TORCH_CHECK(a->device() == plane1.device() && a->is_contiguous() && a->scalar_type() == at::kHalf, op,
                ": alpha1/alpha2 must be contiguous float16 on ", plane1.device());
    TORCH_CHECK(a->dim() == 2 && a->size(0) == n && a->size(1) == g, op, ": alpha is ", a->sizes(), " but n=", n,
                " x k=", k, " at group ", group, " needs [", n, ", ", g, "]");
  }
  cuda_dualbin::DualBinWeight w;
  w.plane1 = plane1.data_ptr<uint8_t>();
  w.plane2 = plane2.data_ptr<uint8_t>();
  w.alpha1 = reinterpret_cast<const uint16_t*>(alpha1.data_ptr<at::Half>());
  w.alpha2 = reinterpret_cast<const uint16_t*>(alpha2.data_ptr<at::Half>());
  w.group = group;
  w.n = n;
  w.k = k;
  return w;
}

at::Tensor dualbin_dequantize_cuda(const at::Tensor& plane1, const at::Tensor& plane2, const at::Tensor& alpha1,
                                   const at::Tensor& alpha2, int64_t group, int64_t rows, int64_t cols) {
  const auto w = make_dualbin_cuda(plane1, plane2, alpha1, alpha2, group, rows, cols, "dualbin_dequantize");
  const c10::cuda::CUDAGuard guard(plane1.device());
  at::Tensor out = at::empty({rows, cols}, plane1.options().dtype(at::kFloat));
  const cudaError_t err = cuda_dualbin::dualbin_dequantize(w, out.data_ptr<float>(),
                                                           c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "dualbin_dequantize (n=", rows, ", k=", cols, "): ", cudaGetErrorString(err));
  return out;
}

at::Tensor dualbin_linear_cuda(const at::Tensor& x, const at::Tensor& plane1, const at::Tensor& plane2,
                               const at::Tensor& alpha1, const at::Tensor& alpha2, int64_t group,
                               int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& bias) {
  const int64_t n = out_features, k = in_features;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "dualbin_linear: x has last dim ", x.dim() ? x.size(-1) : 0,
              " but the weight is n=", n, " x k=", k);
  TORCH_CHECK(x.device() == plane1.device(), "dualbin_linear: x is on ", x.device(), " but the weight on ",
              plane1.device());
  DType dt;
  switch (x.scalar_type()) {
    case at::kFloat: dt = DType::F32; break;
    case at::kBFloat16: dt = DType::BF16; break;
    case at::kHalf: dt = DType::F16; break;
    default: TORCH_CHECK(false, "dualbin_linear: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  const auto w = make_dualbin_cuda(plane1, plane2, alpha1, alpha2, group, n, k, "dualbin_linear");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = k > 0 ? x.numel() / k : 0;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  if (bias.has_value())
    TORCH_CHECK(bias->numel() == n && bias->device() == x.device(), "dualbin_linear: bias has ", bias->numel(),
                " entries on ", bias->device(), " but n=", n, " (m=", m, ", k=", k, ")");
  if (m == 0 || n == 0 || k == 0) {
    at::Tensor y = at::zeros(out_shape, x.options().dtype(at::kFloat));
    if (bias.has_value() && y.numel() > 0) y = y + bias->to(at::kFloat);
    return y.to(x.scalar_type());
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  if (group == 64 && m <= cuda_dualbin::kDualBinGemvMaxM) {
    at::Tensor y = at::empty(out_shape, x.options());
    const cudaError_t err = cuda_dualbin::dualbin_gemv(w, xc.data_ptr(), dt, m, bias.has_value() ? bf.data_ptr<float>()
                                                                                                  : nullptr,
                                                       y.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "dualbin_linear GEMV (m=", m, ", n=", n, ", k=", k, "): ",
                cudaGetErrorString(err));
    return y;
  }
  const at::Tensor wt = dualbin_dequantize_cuda(plane1, plane2, alpha1, alpha2, group, n, k);
  at::Tensor y = at::mm(xc.reshape({m, k}).to(at::kFloat), wt.t());
  if (bias.has_value()) y.add_(bf);
  return y.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CUDA, m) {
  m.impl("dualbin_dequantize", &quantkit::dualbin_dequantize_cuda);
  m.impl("dualbin_linear", &quantkit::dualbin_linear_cuda);
}
