// CUDA impl of quantkit::bitstack_linear (schema in quantkit/_ops.py): the lookup-free decode
// GEMV of csrc/cuda/bitstack_gemv.cu for up to kMaxRows activation rows; above that (prefill)
// the weight is rebuilt with torch ops (u_i v_i by cuBLAS, signs applied) and at::matmul runs.
// quantkit::bitstack_dequantize keeps its reference impl (pure torch ops, runs on CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cuda/bitstack.cuh"

namespace quantkit {
namespace {

constexpr int64_t kMaxRows = 16;  // decode / small batch; larger batches rebuild W + GEMM

at::Tensor rebuild(const at::Tensor& signs, const at::Tensor& u, const at::Tensor& v,
                   const std::optional<at::Tensor>& scale) {
  // bits -> +/-1 (MSB first per row), then sum_i S_i * (u_i v_i) in fp32
  const int64_t n = v.size(2);
  const at::Tensor shifts = at::arange(7, -1, -1, signs.options().dtype(at::kByte));
  at::Tensor bits = signs.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and(1);  // [b, m, nbytes, 8]
  bits = bits.reshape({signs.size(0), signs.size(1), -1}).narrow(2, 0, n).to(at::kFloat);
  at::Tensor uf = u.to(at::kFloat);
  if (scale.has_value()) uf = uf * scale->unsqueeze(1);  // int8 codes times their component scale
  return ((bits * 2 - 1) * at::bmm(uf, v.to(at::kFloat))).sum(0);
}

at::Tensor bitstack_linear_cuda(const at::Tensor& x, const at::Tensor& signs, const at::Tensor& u,
                                const at::Tensor& v, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& scale) {
  const char* op = "bitstack_linear";
  TORCH_CHECK(signs.dim() == 3 && u.dim() == 3 && v.dim() == 3, op, ": signs, u, v must be 3-D, got ", signs.sizes(),
              ", ", u.sizes(), ", ", v.sizes());
  const bool int8 = scale.has_value();
  TORCH_CHECK(signs.scalar_type() == at::kByte &&
                  (int8 ? (u.scalar_type() == at::kChar && v.scalar_type() == at::kChar)
                        : (u.scalar_type() == at::kHalf && v.scalar_type() == at::kHalf)),
              op, ": signs must be uint8 and u, v float16 (no scale) or int8 (with an fp32 scale)");
  const int64_t b = u.size(0), m = u.size(1), k = u.size(2), n = v.size(2);
  TORCH_CHECK(signs.size(0) == b && v.size(0) == b && v.size(1) == k && signs.size(1) == m &&
                  signs.size(2) == (n + 7) / 8,
              op, ": inconsistent shapes signs ", signs.sizes(), ", u ", u.sizes(), ", v ", v.sizes(), " (m=", m,
              ", n=", n, ", k=", k, ")");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == n, op, ": x has last dim ", x.dim() ? x.size(-1) : 0,
              " but the weight is m=", m, " x n=", n);
  const at::Device dev = x.device();
  TORCH_CHECK(x.is_cuda() && signs.device() == dev && u.device() == dev && v.device() == dev, op,
              ": x, signs, u, v must be on one CUDA device");
  if (int8) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->dim() == 2 && scale->size(0) == b &&
                    scale->size(1) == k && scale->device() == dev,
                op, ": scale must be fp32 [", b, ", ", k, "] on ", dev, ", got ", scale->scalar_type(), " ",
                scale->sizes());
  }
  const c10::cuda::CUDAGuard guard(dev);
  const int64_t rows = n > 0 ? x.numel() / n : 0;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = m;
  if (rows == 0 || m == 0 || rows > kMaxRows || !cuda::bitstack_rank_supported(k)) {
    at::Tensor y = at::matmul(x.to(at::kFloat), rebuild(signs, u, v, scale).t());
    if (bias.has_value()) y = y + bias->to(at::kFloat);
    return y.to(x.scalar_type());
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor sc = signs.contiguous(), uc = u.contiguous(), vc = v.contiguous();
  at::Tensor bf;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == m && bias->device() == dev, op, ": bias has ", bias->numel(), " entries but m=", m);
    bf = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({rows, m}, xf.options());
  const float* bias_ptr = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  at::Tensor scc;
  cudaError_t err;
  if (int8) {
    scc = scale->contiguous();
    err = cuda::bitstack_gemv_int8(sc.data_ptr<uint8_t>(), uc.data_ptr<int8_t>(), vc.data_ptr<int8_t>(),
                                   scc.data_ptr<float>(), xf.data_ptr<float>(), bias_ptr, y.data_ptr<float>(), b, m, n,
                                   k, rows, c10::cuda::getCurrentCUDAStream());
  } else {
    err = cuda::bitstack_gemv(sc.data_ptr<uint8_t>(), reinterpret_cast<const __half*>(uc.data_ptr<at::Half>()),
                              reinterpret_cast<const __half*>(vc.data_ptr<at::Half>()), xf.data_ptr<float>(), bias_ptr,
                              y.data_ptr<float>(), b, m, n, k, rows, c10::cuda::getCurrentCUDAStream());
  }
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed for m=", m, ", n=", n, ", k=", k, ", rows=", rows, ": ",
              cudaGetErrorString(err));
  return y.reshape(out_shape).to(x.scalar_type());
}

}  // namespace
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CUDA, m) { m.impl("bitstack_linear", &quantkit::bitstack_linear_cuda); }
