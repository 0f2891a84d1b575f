// quantkit._C: native CPU kernels for the torch.ops.quantkit ops defined in quantkit/_ops.py.
//
// The schemas, fake impls, autograd and the pure-torch reference live in Python; this
// file only registers CPU kernels for the same ops (TORCH_LIBRARY_IMPL), so importing the
// module is enough to switch the CPU dispatch key to native code. It deliberately avoids
// <torch/extension.h> / pybind11 (a ~25 s header) and exposes a plain CPython module.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <vector>

#include "cpu/dualbin_linear.h"
#include "cpu/bitstack_linear.h"
#include "cpu/intk_linear.h"
#include "cpu/lut4_linear.h"

namespace quantkit {
namespace {

using cpu::DType;

DType to_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "lut4_linear: ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// Largest batch m (rows of x) that lut4_linear runs on the fused decode kernel; above it
// the weight is dequantized in row tiles and a library GEMM runs: fp32 x -> fp32 tiles and
// MKL sgemm; bf16/fp16 x -> tiles rounded to x.dtype and oneDNN (AMX for bf16).
// Measured on the dev box (2-core Sapphire Rapids VM, AVX-512, nf4 / blocksize 64 /
// double quant, 2 threads), fused vs dequant+GEMM in ms.
// fp32 x (dequant to fp32 + MKL sgemm):
//   4096x4096   m=32  5.4 vs  8.5   m=48  8.1 vs  9.9   m=64 11.1 vs  9.0   m=96 18.5 vs 11.4
//   11008x4096  m=32 14.3 vs 23.0   m=48 21.9 vs 26.3   m=64 29.8 vs 24.3
//   576x1536    m=16 0.17 vs 0.28   m=32 0.41 vs 0.34   m=48 0.47 vs 0.40
//   1536x576    m=16 0.23 vs 0.21   m=32 0.39 vs 0.28
// The fused kernel's cost grows linearly with m at roughly half MKL's FMA efficiency
// (it re-runs the 4-bit decode per group of 8 rows and cannot block like MKL), while
// dequant+MKL pays a fixed ~4 bytes written and read per weight; the crossover is near
// m = 56 for K >= 2048 and near m = 24 for the small K of SmolLM-class layers, where the
// fused kernel's per-row overhead is relatively larger.
// bf16 x (dequant to bf16 + oneDNN AMX bf16 GEMM), 2026-11-23:
//   4096x4096   m=8 1.46 vs 2.17   m=12 2.43 vs 2.22   m=16 3.92 vs 2.27   m=32 7.91 vs 2.43
//   11008x4096  m=8 3.85 vs 5.96   m=12 6.40 vs 6.04   m=16 7.74 vs 6.18   m=32 16.0 vs 6.69
//   4096x11008  m=8 5.78 vs 6.22   m=12 6.19 vs 6.54   m=16 10.4 vs 6.59   m=32 15.6 vs 7.43
//   576x576     m=4 0.030 vs 0.057   m=8 0.048 vs 0.057   m=12 0.075 vs 0.058
//   1536x576    m=4 0.078 vs 0.116   m=8 0.110 vs 0.117   m=12 0.168 vs 0.120
//   576x1536    m=4 0.057 vs 0.112   m=8 0.124 vs 0.116   m=12 0.183 vs 0.113
// With AMX the GEMM itself is nearly free at these m (4096x4096: ~0.7 ms at m=8..32 on
// tiles already dequantized); the path costs a fixed ~1 ms per 16M weights to decode and
// write the bf16 tiles, so it wins from m ~ 12 (K >= 2048) / m ~ 8 (small K).
// fp16 x (dequant to fp16 + oneDNN fp16 GEMM: no AMX-FP16 on this CPU, AVX512-FP16 with
// fp32 accumulation; still faster than the fp32 path above m ~ 8 for K >= 2048):
//   4096x4096   m=8 2.01 vs 3.34   m=16 3.97 vs 4.01   m=24 5.90 vs 4.59   m=32 7.75 vs 5.42
//   11008x4096  m=8 4.14 vs 8.85   m=16 8.08 vs 10.2   m=24 12.3 vs 12.1   m=32 16.5 vs 14.9
//   576x576     m=8 0.054 vs 0.084   m=16 0.117 vs 0.100   m=24 0.171 vs 0.114
//   576x1536    m=8 0.131 vs 0.187   m=16 0.255 vs 0.229   m=24 0.379 vs 0.267
// (Absolute fused times drift by ~20 % between days on this VM; each table was taken in
// one sitting.) QUANTKIT_LUT4_GEMM_M=<m> overrides every dtype (benchmarks and tests);
// QUANTKIT_LUT4_GEMM_M_HALF=<m> only bf16/fp16.
int64_t gemm_threshold(int64_t k, DType xt) {
  static const int64_t env = [] {
    const char* v = std::getenv("QUANTKIT_LUT4_GEMM_M");
    return v ? std::atoll(v) : int64_t{-1};
  }();
  if (env >= 0) return env;
  if (xt == DType::F32) return k >= 2048 ? 48 : 24;
  static const int64_t env_half = [] {
    const char* v = std::getenv("QUANTKIT_LUT4_GEMM_M_HALF");
    return v ? std::atoll(v) : int64_t{-1};
  }();
  if (env_half >= 0) return env_half;
  if (xt == DType::BF16) return k >= 2048 ? 12 : 8;
  return k >= 2048 ? 16 : 12;  // F16
}

cpu::Lut4Weight make_weight(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                            int64_t blocksize, int64_t rows, int64_t cols,
                            const std::optional<at::Tensor>& absmax_code,
                            const std::optional<at::Tensor>& absmax_scale, double absmax_offset,
                            int64_t absmax_blocksize, const char* op) {
  // rows = n (out_features), cols = k (in_features)
  TORCH_CHECK(rows >= 0 && cols >= 0, op, ": weight shape n=", rows, ", k=", cols, " must be non-negative");
  TORCH_CHECK(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  const int64_t numel = rows * cols;
  const int64_t nb = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK(packed.device().is_cpu() && absmax.device().is_cpu() && code.device().is_cpu(),
              op, ": CPU kernel got tensors on ", packed.device(), "/", absmax.device(), "/", code.device());
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, op, ": packed has ", packed.numel(), " bytes but an n=", rows,
              " x k=", cols, " weight needs ", (numel + 1) / 2);
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, op, ": code must be fp32 [16], got ",
              code.scalar_type(), " ", code.sizes());
  TORCH_CHECK(absmax.numel() == nb, op, ": absmax has ", absmax.numel(), " entries but n=", rows, " x k=", cols,
              " at blocksize ", blocksize, " needs ", nb);
  TORCH_CHECK(packed.is_contiguous() && absmax.is_contiguous() && code.is_contiguous(), op,
              ": packed, absmax and code must be contiguous");
  cpu::Lut4Weight w{};
  w.packed = packed.data_ptr<uint8_t>();
  w.code = code.data_ptr<float>();
  w.blocksize = blocksize;
  w.rows = rows;
  w.cols = cols;
  w.absmax_offset = static_cast<float>(absmax_offset);  // the reference adds it as fp32
  w.absmax_blocksize = absmax_blocksize;
  if (absmax.scalar_type() == at::kByte) {
    TORCH_CHECK(absmax_code.has_value() && absmax_scale.has_value(), op,
                ": uint8 (double-quantized) absmax needs absmax_code and absmax_scale");
    TORCH_CHECK(absmax_blocksize > 0, op, ": absmax_blocksize must be positive, got ", absmax_blocksize);
    const at::Tensor& ac = *absmax_code;
    const at::Tensor& as = *absmax_scale;
    TORCH_CHECK(ac.scalar_type() == at::kFloat && ac.numel() == 256 && ac.is_contiguous() && ac.device().is_cpu(),
                op, ": absmax_code must be contiguous CPU fp32 [256], got ", ac.scalar_type(), " ", ac.sizes());
    const int64_t nn = (nb + absmax_blocksize - 1) / absmax_blocksize;
    TORCH_CHECK(as.scalar_type() == at::kFloat && as.numel() == nn && as.is_contiguous() && as.device().is_cpu(),
                op, ": absmax_scale must be contiguous CPU fp32 [", nn, "], got ", as.scalar_type(), " ", as.sizes());
    w.absmax_u8 = absmax.data_ptr<uint8_t>();
    w.absmax_code = ac.data_ptr<float>();
    w.absmax_scale = as.data_ptr<float>();
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, op, ": absmax must be fp32 or uint8, got ",
                absmax.scalar_type());
    w.absmax_f32 = absmax.data_ptr<float>();
  }
  return w;
}

at::Tensor lut4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                               int64_t blocksize, int64_t rows, int64_t cols,
                               const std::optional<at::Tensor>& absmax_code,
                               const std::optional<at::Tensor>& absmax_scale, double absmax_offset,
                               int64_t absmax_blocksize) {
  const cpu::Lut4Weight w = make_weight(packed, absmax, code, blocksize, rows, cols, absmax_code, absmax_scale,
                                        absmax_offset, absmax_blocksize, "lut4_dequantize");
  at::Tensor out = at::empty({rows, cols}, packed.options().dtype(at::kFloat));
  cpu::lut4_dequantize(w, out.data_ptr<float>());
  return out;
}

at::Tensor lut4_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const at::Tensor& code, int64_t blocksize, int64_t out_features, int64_t in_features,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& absmax_code,
                           const std::optional<at::Tensor>& absmax_scale, double absmax_offset,
                           int64_t absmax_blocksize) {
  const int64_t n = out_features, k = in_features;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "lut4_linear: x has last dim ", x.dim() ? x.size(-1) : 0,
              " but the weight is n=", n, " x k=", k);
  TORCH_CHECK(x.device().is_cpu(), "lut4_linear: CPU kernel got x on ", x.device());
  const DType xt = to_dtype(x, "x");
  const cpu::Lut4Weight w = make_weight(packed, absmax, code, blocksize, n, k, absmax_code, absmax_scale,
                                        absmax_offset, absmax_blocksize, "lut4_linear");
  const int64_t m = k > 0 ? x.numel() / k : 0;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  DType bt = DType::F32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n && bias->device().is_cpu(), "lut4_linear: bias has ", bias->numel(),
                " entries but n=", n, " (m=", m, ", k=", k, ")");
    bt = to_dtype(*bias, "bias");
  }
  if (m == 0 || n == 0 || k == 0) {
    // Degenerate shapes: the product is empty or all zeros; keep the reference semantics.
    at::Tensor y = at::zeros(out_shape, x.options().dtype(at::kFloat));
    if (bias.has_value() && y.numel() > 0) y = y + bias->to(at::kFloat);
    return y.to(x.scalar_type());
  }
  const at::Tensor xc = x.contiguous();
  if (m > gemm_threshold(k, xt)) {
    // Tiles of the dequantized weight are written into one reused buffer: a full copy of an
    // LLM weight (64-180 MB in fp32) is a fresh mmap each call, and its page faults alone
    // cost more (~10 ms for 4096x4096 fp32) than the GEMM.
    if (xt != DType::F32) {
      // Half-precision x: dequantize each row tile straight to x.dtype (rounded as
      // Tensor.to does) and run the GEMM in that dtype, where oneDNN uses AMX (bf16) or
      // AVX512-FP16 and accumulates in fp32; this is what bitsandbytes does (dequantize to
      // the compute dtype, then F.linear). A bias of x's dtype is fused (addmm, one rounding);
      // any other bias is added in fp32 afterwards.
      const at::ScalarType st = x.scalar_type();
      // 8 MB tiles as for fp32 (measured: 4 and 16 MB within ~10 %; 32 MB tiles are served
      // by a fresh mmap each call again).
      const int64_t tile = std::min<int64_t>(n, std::max<int64_t>(64, (int64_t{8} << 20) / (2 * k)));
      at::Tensor wbuf = at::empty({tile, k}, packed.options().dtype(st));
      const at::Tensor x2 = xc.reshape({m, k});
      at::Tensor y = at::empty({m, n}, x2.options());
      const bool fuse_bias = bias.has_value() && bias->scalar_type() == st;
      const at::Tensor bc = fuse_bias ? bias->contiguous().reshape({n}) : at::Tensor();
      for (int64_t n0 = 0; n0 < n; n0 += tile) {
        const int64_t nt = std::min(tile, n - n0);
        at::Tensor wt = wbuf.narrow(0, 0, nt);
        cpu::lut4_dequantize_rows_to(w, n0, n0 + nt, xt, wt.data_ptr());
        at::Tensor yt = y.narrow(1, n0, nt);
        if (fuse_bias) at::addmm_out(yt, bc.narrow(0, n0, nt), x2, wt.t());
        else at::mm_out(yt, x2, wt.t());
      }
      if (bias.has_value() && !fuse_bias) y = (y.to(at::kFloat) + bias->to(at::kFloat)).to(st);
      return y.reshape(out_shape);
    }
    // fp32 x: dequantize to fp32 (bit-exact) and let MKL run sgemm.
    const int64_t tile = std::min<int64_t>(n, std::max<int64_t>(64, (int64_t{8} << 20) / (4 * k)));
    at::Tensor wbuf = at::empty({tile, k}, packed.options().dtype(at::kFloat));
    const at::Tensor x2 = xc.reshape({m, k}).to(at::kFloat);
    at::Tensor y = at::empty({m, n}, x2.options());
    for (int64_t n0 = 0; n0 < n; n0 += tile) {
      const int64_t nt = std::min(tile, n - n0);
      at::Tensor wt = wbuf.narrow(0, 0, nt);
      cpu::lut4_dequantize_rows(w, n0, n0 + nt, wt.data_ptr<float>());
      at::Tensor yt = y.narrow(1, n0, nt);  // strided [m, nt] view: BLAS writes it with ldc = n
      at::mm_out(yt, x2, wt.t());
    }
    if (bias.has_value()) y.add_(bias->to(at::kFloat));
    return y.to(x.scalar_type()).reshape(out_shape);
  }
  at::Tensor y = at::empty(out_shape, x.options());
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  cpu::lut4_gemm_small(w, xc.data_ptr(), xt, m, bias.has_value() ? bc.data_ptr() : nullptr, bt, y.data_ptr());
  return y;
}

}  // namespace
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("lut4_dequantize", &quantkit::lut4_dequantize_cpu);
  m.impl("lut4_linear", &quantkit::lut4_linear_cpu);
}

// ---- int-k (quantkit/formats/intk.py) ------------------------------------------------------
namespace quantkit {
namespace {

// Largest m that intk_linear runs on the decode-and-dot kernel; above it the weight is
// decoded into fp32 row tiles and MKL sgemm runs (the dot kernel re-reads x per weight row
// and cannot block like a GEMM). QUANTKIT_INTK_GEMM_M=<m> overrides (tests, benchmarks).
int64_t intk_gemm_threshold() {
  static const int64_t v = [] {
    const char* e = std::getenv("QUANTKIT_INTK_GEMM_M");
    return e ? std::atoll(e) : int64_t{8};
  }();
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
  const int64_t n = out_features, k = in_features;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "intk_linear: x has last dim ", x.dim() ? x.size(-1) : 0,
              " but the weight is n=", n, " x k=", k);
  TORCH_CHECK(x.device().is_cpu(), "intk_linear: CPU kernel got x on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "intk_linear: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const cpu::IntKWeight w = make_intk(packed, scale, bits, offset, n, k, "intk_linear");
  const int64_t m = k > 0 ? x.numel() / k : 0;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor bf;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n && bias->device().is_cpu(), "intk_linear: bias has ", bias->numel(),
                " entries but n=", n, " (m=", m, ", k=", k, ")");
    bf = bias->to(at::kFloat).contiguous().reshape({n});
  }
  if (m == 0 || n == 0 || k == 0) {
    at::Tensor y = at::zeros(out_shape, x.options().dtype(at::kFloat));
    if (bias.has_value() && y.numel() > 0) y = y + bf;
    return y.to(x.scalar_type());
  }
  const at::Tensor x2 = x.reshape({m, k}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, n}, x2.options());
  if (m <= intk_gemm_threshold()) {
    cpu::intk_gemm_small(w, x2.data_ptr<float>(), m, bias.has_value() ? bf.data_ptr<float>() : nullptr,
                         y.data_ptr<float>());
  } else {
    // 8 MB fp32 tiles in one reused buffer (as lut4_linear: a full-size copy is a fresh mmap)
    const int64_t tile = std::min<int64_t>(n, std::max<int64_t>(64, (int64_t{8} << 20) / (4 * k)));
    at::Tensor wbuf = at::empty({tile, k}, x2.options());
    for (int64_t n0 = 0; n0 < n; n0 += tile) {
      const int64_t nt = std::min(tile, n - n0);
      at::Tensor wt = wbuf.narrow(0, 0, nt);
      cpu::intk_dequantize_rows(w, n0, n0 + nt, wt.data_ptr<float>());
      at::Tensor yt = y.narrow(1, n0, nt);
      at::mm_out(yt, x2, wt.t());
    }
    if (bias.has_value()) y.add_(bf);
  }
  return y.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("intk_dequantize", &quantkit::intk_dequantize_cpu);
  m.impl("intk_linear", &quantkit::intk_linear_cpu);
}

// ---- BitStack (csrc/cpu/bitstack_linear.cpp) ----------------------------------------------
namespace quantkit {
namespace {

// Largest number of x rows run on the table-lookup kernel (no dense W); above it the
// weight is rebuilt once (u_i v_i by MKL, signs applied) and a GEMM runs. Measured in
// docs/benchmarks.md (BitStack section); QUANTKIT_BITSTACK_GEMM_M=<m> overrides.
int64_t bitstack_gemm_threshold() {
  static const int64_t v = [] {
    const char* e = std::getenv("QUANTKIT_BITSTACK_GEMM_M");
    return e ? std::atoll(e) : int64_t{4};
  }();
  return v;
}

cpu::BitStackWeight make_bitstack(const at::Tensor& signs, const at::Tensor& u, const at::Tensor& v, const char* op) {
  TORCH_CHECK(signs.dim() == 3 && u.dim() == 3 && v.dim() == 3, op,
              ": signs, u, v must be 3-D [b, m, ceil(n/8)], [b, m, k], [b, k, n]; got ", signs.sizes(), ", ",
              u.sizes(), ", ", v.sizes());
  TORCH_CHECK(signs.scalar_type() == at::kByte && u.scalar_type() == at::kHalf && v.scalar_type() == at::kHalf, op,
              ": signs must be uint8 and u, v float16; got ", signs.scalar_type(), ", ", u.scalar_type(), ", ",
              v.scalar_type());
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
  w.u = reinterpret_cast<const uint16_t*>(u.data_ptr<at::Half>());
  w.v = reinterpret_cast<const uint16_t*>(v.data_ptr<at::Half>());
  w.b = b;
  w.m = m;
  w.n = n;
  w.k = k;
  return w;
}

at::Tensor bitstack_dequantize_cpu(const at::Tensor& signs, const at::Tensor& u, const at::Tensor& v) {
  const cpu::BitStackWeight w = make_bitstack(signs, u, v, "bitstack_dequantize");
  at::Tensor out = at::empty({w.m, w.n}, u.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  for (int64_t i = 0; i < w.b; ++i) {
    const at::Tensor uv = at::mm(u[i].to(at::kFloat), v[i].to(at::kFloat)).contiguous();  // MKL, [m, n]
    cpu::bitstack_apply_signs(w.signs + i * w.m * ((w.n + 7) / 8), uv.data_ptr<float>(), w.m, w.n, i == 0,
                              out.data_ptr<float>());
  }
  return out;
}

at::Tensor bitstack_linear_cpu(const at::Tensor& x, const at::Tensor& signs, const at::Tensor& u, const at::Tensor& v,
                               const std::optional<at::Tensor>& bias) {
  const cpu::BitStackWeight w = make_bitstack(signs, u, v, "bitstack_linear");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.n, "bitstack_linear: x has last dim ", x.dim() ? x.size(-1) : 0,
              " but the weight is m=", w.m, " x n=", w.n);
  TORCH_CHECK(x.device().is_cpu(), "bitstack_linear: CPU kernel got x on ", x.device());
  const DType xt = to_dtype(x, "x");
  const int64_t rows = w.n > 0 ? x.numel() / w.n : 0;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w.m;
  DType bt = DType::F32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == w.m && bias->device().is_cpu(), "bitstack_linear: bias has ", bias->numel(),
                " entries but m=", w.m);
    bt = to_dtype(*bias, "bias");
  }
  if (rows == 0 || w.m == 0 || w.n == 0 || rows > bitstack_gemm_threshold()) {
    // Prefill / large batch: rebuild W once and let MKL run the GEMM (the lookup kernel
    // rebuilds its tables per row of x, so its cost grows with rows).
    at::Tensor wd = bitstack_dequantize_cpu(signs, u, v);
    at::Tensor y = at::matmul(x.to(at::kFloat), wd.t());
    if (bias.has_value()) y = y + bias->to(at::kFloat);
    return y.to(x.scalar_type());
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(out_shape, x.options());
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  cpu::bitstack_gemv(w, xc.data_ptr(), xt, rows, bias.has_value() ? bc.data_ptr() : nullptr, bt, y.data_ptr());
  return y;
}

}  // namespace
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("bitstack_dequantize", &quantkit::bitstack_dequantize_cpu);
  m.impl("bitstack_linear", &quantkit::bitstack_linear_cpu);
}

// ---- dualbin (DB-LLM) ------------------------------------------------------------------
namespace quantkit {
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
  static const int64_t v = [] {
    const char* e = std::getenv("QUANTKIT_DUALBIN_GEMM_M");
    return e ? std::atoll(e) : int64_t{8};
  }();
  return v;
}

at::Tensor dualbin_linear_cpu(const at::Tensor& x, const at::Tensor& plane1, const at::Tensor& plane2,
                              const at::Tensor& alpha1, const at::Tensor& alpha2, int64_t group,
                              int64_t out_features, int64_t in_features, const std::optional<at::Tensor>& bias) {
  const int64_t n = out_features, k = in_features;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "dualbin_linear: x has last dim ", x.dim() ? x.size(-1) : 0,
              " but the weight is n=", n, " x k=", k);
  TORCH_CHECK(x.device().is_cpu(), "dualbin_linear: CPU kernel got x on ", x.device());
  const cpu::DType xt = to_dtype(x, "x");
  const cpu::DualBinWeight w = make_dualbin(plane1, plane2, alpha1, alpha2, group, n, k, "dualbin_linear");
  const int64_t m = k > 0 ? x.numel() / k : 0;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  cpu::DType bt = cpu::DType::F32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n && bias->device().is_cpu(), "dualbin_linear: bias has ", bias->numel(),
                " entries but n=", n, " (m=", m, ", k=", k, ")");
    bt = to_dtype(*bias, "bias");
  }
  if (m == 0 || n == 0 || k == 0) {
    at::Tensor y = at::zeros(out_shape, x.options().dtype(at::kFloat));
    if (bias.has_value() && y.numel() > 0) y = y + bias->to(at::kFloat);
    return y.to(x.scalar_type());
  }
  const at::Tensor xc = x.contiguous();
  if (m > dualbin_gemm_threshold()) {
    // fp32 row tiles of W (8 MB, reused) and MKL sgemm; same values as the reference up to
    // summation order, for every x dtype (x is computed in fp32, as the reference does).
    const int64_t tile = std::min<int64_t>(n, std::max<int64_t>(64, (int64_t{8} << 20) / (4 * k)));
    at::Tensor wbuf = at::empty({tile, k}, plane1.options().dtype(at::kFloat));
    const at::Tensor x2 = xc.reshape({m, k}).to(at::kFloat);
    at::Tensor y = at::empty({m, n}, x2.options());
    for (int64_t n0 = 0; n0 < n; n0 += tile) {
      const int64_t nt = std::min(tile, n - n0);
      at::Tensor wt = wbuf.narrow(0, 0, nt);
      cpu::dualbin_dequantize_rows(w, n0, n0 + nt, wt.data_ptr<float>());
      at::Tensor yt = y.narrow(1, n0, nt);
      at::mm_out(yt, x2, wt.t());
    }
    if (bias.has_value()) y.add_(bias->to(at::kFloat));
    return y.to(x.scalar_type()).reshape(out_shape);
  }
  at::Tensor y = at::empty(out_shape, x.options());
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  cpu::dualbin_gemm_small(w, xc.data_ptr(), xt, m, bias.has_value() ? bc.data_ptr() : nullptr, bt, y.data_ptr());
  return y;
}

}  // namespace
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("dualbin_dequantize", &quantkit::dualbin_dequantize_cpu);
  m.impl("dualbin_linear", &quantkit::dualbin_linear_cpu);
}

// ---- Python module: importing it runs the static registration above -------------------
namespace {
PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(quantkit::cpu::lut4_cpu_isa()); }
PyObject* bitstack_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(quantkit::cpu::bitstack_cpu_isa());
}
PyObject* dualbin_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(quantkit::cpu::dualbin_cpu_isa()); }

PyMethodDef kMethods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Vector ISA the lut4 CPU kernels use: avx512, avx2 or scalar."},
    {"bitstack_cpu_isa", bitstack_cpu_isa, METH_NOARGS, "Vector ISA the BitStack CPU kernels use."},
    {"dualbin_cpu_isa", dualbin_cpu_isa, METH_NOARGS, "ISA of the dualbin CPU kernel: avx512 or scalar."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "quantkit native kernels; importing registers CPU impls of torch.ops.quantkit.*",
                       -1, kMethods};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
