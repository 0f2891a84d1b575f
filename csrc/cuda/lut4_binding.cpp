// CUDA impls of quantkit::lut4_linear / quantkit::lut4_dequantize (schemas in quantkit/_ops.py).
//
// Batches of 1..8 activation rows run the fused GEMV (csrc/cuda/lut4_gemv.cu). Larger batches
// dequantize the weight to the activation dtype with our kernel and call cuBLAS through
// at::addmm / at::mm, as bitsandbytes does for 4-bit training batches; a fused tensor-core
// GEMM is not written yet. Semantics for bf16/fp16 at large batch match the CPU kernel's
// (weight rounded to x.dtype before the product; see quantkit/_ops.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cuda/lut4.cuh"

namespace quantkit {
namespace {

using cuda::DType;

DType to_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, op, ": x must be float32, bfloat16 or float16, got ", t);
  }
}

void check_on(const at::Tensor& t, const at::Device& dev, const char* what, const char* op) {
  TORCH_CHECK(t.device() == dev, op, ": ", what, " is on ", t.device(), " but x/packed are on ", dev);
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous");
}

cuda::Lut4Weight make_weight(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                             int64_t blocksize, int64_t n, int64_t k, const std::optional<at::Tensor>& absmax_code,
                             const std::optional<at::Tensor>& absmax_scale, double absmax_offset,
                             int64_t absmax_blocksize, const char* op) {
  TORCH_CHECK(n >= 0 && k >= 0, op, ": weight shape n=", n, ", k=", k, " must be non-negative");
  TORCH_CHECK(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  TORCH_CHECK(packed.is_cuda(), op, ": CUDA kernel got packed on ", packed.device());
  const at::Device dev = packed.device();
  const int64_t numel = n * k;
  const int64_t nb = (numel + blocksize - 1) / blocksize;
  check_on(packed, dev, "packed", op);
  check_on(absmax, dev, "absmax", op);
  check_on(code, dev, "code", op);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == (numel + 1) / 2, op, ": packed must be uint8 [",
              (numel + 1) / 2, "] for an n=", n, " x k=", k, " weight, got ", packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, op, ": code must be fp32 [16], got ",
              code.scalar_type(), " ", code.sizes());
  TORCH_CHECK(absmax.numel() == nb, op, ": absmax has ", absmax.numel(), " entries but n=", n, " x k=", k,
              " at blocksize ", blocksize, " needs ", nb);
  cuda::Lut4Weight w;
  w.packed = packed.data_ptr<uint8_t>();
  w.code = code.data_ptr<float>();
  w.blocksize = blocksize;
  w.n = n;
  w.k = k;
  w.absmax_offset = static_cast<float>(absmax_offset);
  w.absmax_blocksize = absmax_blocksize;
  if (absmax.scalar_type() == at::kByte) {
    TORCH_CHECK(absmax_code.has_value() && absmax_scale.has_value(), op,
                ": uint8 (double-quantized) absmax needs absmax_code and absmax_scale");
    TORCH_CHECK(absmax_blocksize > 0, op, ": absmax_blocksize must be positive, got ", absmax_blocksize);
    check_on(*absmax_code, dev, "absmax_code", op);
    check_on(*absmax_scale, dev, "absmax_scale", op);
    const int64_t nn = (nb + absmax_blocksize - 1) / absmax_blocksize;
    TORCH_CHECK(absmax_code->scalar_type() == at::kFloat && absmax_code->numel() == 256, op,
                ": absmax_code must be fp32 [256], got ", absmax_code->scalar_type(), " ", absmax_code->sizes());
    TORCH_CHECK(absmax_scale->scalar_type() == at::kFloat && absmax_scale->numel() == nn, op,
                ": absmax_scale must be fp32 [", nn, "], got ", absmax_scale->scalar_type(), " ",
                absmax_scale->sizes());
    w.absmax_u8 = absmax.data_ptr<uint8_t>();
    w.absmax_code = absmax_code->data_ptr<float>();
    w.absmax_scale = absmax_scale->data_ptr<float>();
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, op, ": absmax must be fp32 or uint8, got ", absmax.scalar_type());
    w.absmax_f32 = absmax.data_ptr<float>();
  }
  return w;
}

at::Tensor dequantize_to(const cuda::Lut4Weight& w, const at::Tensor& like, at::ScalarType st, const char* op) {
  at::Tensor out = at::empty({w.n, w.k}, like.options().dtype(st));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(like.device().index()).stream();
  const cudaError_t err = cuda::lut4_dequantize(w, out.data_ptr(), to_dtype(st, op), stream);
  TORCH_CHECK(err == cudaSuccess, op, ": dequantize kernel failed for n=", w.n, " k=", w.k, ": ",
              cudaGetErrorString(err));
  return out;
}

at::Tensor lut4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                                int64_t blocksize, int64_t rows, int64_t cols,
                                const std::optional<at::Tensor>& absmax_code,
                                const std::optional<at::Tensor>& absmax_scale, double absmax_offset,
                                int64_t absmax_blocksize) {
  const c10::cuda::CUDAGuard guard(packed.device());
  const cuda::Lut4Weight w = make_weight(packed, absmax, code, blocksize, rows, cols, absmax_code, absmax_scale,
                                         absmax_offset, absmax_blocksize, "lut4_dequantize");
  return dequantize_to(w, packed, at::kFloat, "lut4_dequantize");
}

at::Tensor lut4_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                            const at::Tensor& code, int64_t blocksize, int64_t out_features, int64_t in_features,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& absmax_code,
                            const std::optional<at::Tensor>& absmax_scale, double absmax_offset,
                            int64_t absmax_blocksize) {
  const char* op = "lut4_linear";
  const int64_t n = out_features, k = in_features;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, op, ": x has last dim ", x.dim() ? x.size(-1) : 0,
              " but the weight is n=", n, " x k=", k);
  TORCH_CHECK(x.is_cuda() && x.device() == packed.device(), op, ": x is on ", x.device(), " but packed is on ",
              packed.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType st = x.scalar_type();
  const DType dt = to_dtype(st, op);
  const cuda::Lut4Weight w = make_weight(packed, absmax, code, blocksize, n, k, absmax_code, absmax_scale,
                                         absmax_offset, absmax_blocksize, op);
  const int64_t m = k > 0 ? x.numel() / k : 0;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n && bias->device() == x.device(), op, ": bias has ", bias->numel(),
                " entries on ", bias->device(), " but n=", n, " on ", x.device(), " (m=", m, ", k=", k, ")");
  }
  if (m == 0 || n == 0 || k == 0) {
    at::Tensor y = at::zeros(out_shape, x.options().dtype(at::kFloat));
    if (bias.has_value() && y.numel() > 0) y = y + bias->to(at::kFloat);
    return y.to(st);
  }
  const at::Tensor xc = x.contiguous();
  if (m <= cuda::kLut4GemvMaxM) {
    at::Tensor y = at::empty(out_shape, x.options());
    const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
    const cudaError_t err = cuda::lut4_gemv(w, xc.data_ptr(), dt, m, bias.has_value() ? b32.data_ptr<float>() : nullptr,
                                            y.data_ptr(), stream);
    TORCH_CHECK(err == cudaSuccess, op, ": GEMV kernel failed for m=", m, " n=", n, " k=", k, ": ",
                cudaGetErrorString(err));
    return y;
  }
  // Large batch: dequantize once to x.dtype, then cuBLAS (fp32 accumulation).
  const at::Tensor wd = dequantize_to(w, x, st, op);
  const at::Tensor x2 = xc.reshape({m, k});
  at::Tensor y;
  if (bias.has_value() && bias->scalar_type() == st) {
    y = at::addmm(bias->reshape({n}), x2, wd.t());
  } else {
    y = at::mm(x2, wd.t());
    if (bias.has_value()) y = (y.to(at::kFloat) + bias->to(at::kFloat)).to(st);
  }
  return y.reshape(out_shape);
}

}  // namespace
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CUDA, m) {
  m.impl("lut4_dequantize", &quantkit::lut4_dequantize_cuda);
  m.impl("lut4_linear", &quantkit::lut4_linear_cuda);
}
