// CPU ops of the lut4 format (nf4 / fp4, bitsandbytes layout; quantkit/formats/lut4.py):
// checks and dispatch for torch.ops.quantkit.lut4_dequantize / lut4_linear; the kernels are
// in csrc/cpu/lut4_linear.cpp, the shared glue in csrc/ops/common.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "cpu/lut4_linear.h"
#include "ops/common.h"

namespace quantkit {
namespace ops {
namespace {

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
  static const int64_t env = env_int64("QUANTKIT_LUT4_GEMM_M", -1);
  if (env >= 0) return env;
  if (xt == DType::F32) return k >= 2048 ? 48 : 24;
  static const int64_t env_half = env_int64("QUANTKIT_LUT4_GEMM_M_HALF", -1);
  if (env_half >= 0) return env_half;
  if (xt == DType::BF16) return k >= 2048 ? 12 : 8;
  return k >= 2048 ? 16 : 12;  // F16
}

cpu::Lut4Weight make_lut4(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
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
  const cpu::Lut4Weight w = make_lut4(packed, absmax, code, blocksize, rows, cols, absmax_code, absmax_scale,
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
  constexpr const char* op = "lut4_linear";
  const int64_t n = out_features, k = in_features;
  check_x(x, n, k, op);
  const DType xt = to_dtype(x, op, "x");
  const cpu::Lut4Weight w = make_lut4(packed, absmax, code, blocksize, n, k, absmax_code, absmax_scale,
                                      absmax_offset, absmax_blocksize, op);
  const int64_t m = rows_of(x, k);
  const std::vector<int64_t> out_shape = out_shape_of(x, n);
  check_bias(bias, n, m, k, op);
  const DType bt = bias_dtype(bias, op);
  if (m == 0 || n == 0 || k == 0) return empty_product_linear(x, out_shape, bias);
  const at::Tensor xc = x.contiguous();
  if (m > gemm_threshold(k, xt)) {
    at::Tensor y;
    if (xt != DType::F32) {
      // Half-precision x: dequantize each row tile straight to x.dtype (rounded as
      // Tensor.to does) and run the GEMM in that dtype, where oneDNN uses AMX (bf16) or
      // AVX512-FP16 and accumulates in fp32; this is what bitsandbytes does (dequantize to
      // the compute dtype, then F.linear).
      y = tiled_dequant_mm(xc.reshape({m, k}), n, bias, [&](int64_t n0, int64_t n1, void* dst) {
        cpu::lut4_dequantize_rows_to(w, n0, n1, xt, dst);
      });
    } else {
      // fp32 x: dequantize to fp32 (bit-exact) and let MKL run sgemm.
      y = tiled_dequant_mm(xc.reshape({m, k}).to(at::kFloat), n, bias, [&](int64_t n0, int64_t n1, void* dst) {
        cpu::lut4_dequantize_rows(w, n0, n1, static_cast<float*>(dst));
      });
    }
    return y.to(x.scalar_type()).reshape(out_shape);
  }
  at::Tensor y = at::empty(out_shape, x.options());
  at::Tensor bc;
  cpu::lut4_gemm_small(w, xc.data_ptr(), xt, m, bias_data(bias, bc), bt, y.data_ptr());
  return y;
}

// Rows ids of the table [rows, cols], each decoded on its own (lut4_dequantize_rows handles
// a row that starts inside a block or on an odd nibble), bit-identical to lut4_dequantize.
// The projections of one input in one call (q/k/v, gate/up): y = cat_j(lut4_linear(x, W_j, b_j), -1).
// Small m runs lut4_gemm_small_multi (one parallel region, x prepared once; outputs equal the
// single-weight kernel's bit for bit); large m, or shapes its fast path does not take, run
// lut4_linear_cpu per weight and concatenate.
at::Tensor lut4_linear_multi_cpu(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                 at::TensorList code, at::IntArrayRef blocksize, at::IntArrayRef out_features,
                                 int64_t in_features, const c10::List<std::optional<at::Tensor>>& bias,
                                 const c10::List<std::optional<at::Tensor>>& absmax_code,
                                 const c10::List<std::optional<at::Tensor>>& absmax_scale,
                                 at::ArrayRef<double> absmax_offset, at::IntArrayRef absmax_blocksize) {
  constexpr const char* op = "lut4_linear_multi";
  const int64_t nw = static_cast<int64_t>(packed.size());
  TORCH_CHECK(nw >= 1, op, ": needs at least one weight");
  TORCH_CHECK(static_cast<int64_t>(absmax.size()) == nw && static_cast<int64_t>(code.size()) == nw &&
                  static_cast<int64_t>(blocksize.size()) == nw && static_cast<int64_t>(out_features.size()) == nw &&
                  static_cast<int64_t>(bias.size()) == nw && static_cast<int64_t>(absmax_code.size()) == nw &&
                  static_cast<int64_t>(absmax_scale.size()) == nw && static_cast<int64_t>(absmax_offset.size()) == nw &&
                  static_cast<int64_t>(absmax_blocksize.size()) == nw,
              op, ": every per-weight list must have ", nw, " entries (one per packed weight)");
  const int64_t k = in_features;
  int64_t total = 0;
  for (int64_t j = 0; j < nw; ++j) total += out_features[j];
  check_x(x, total, k, op);
  const DType xt = to_dtype(x, op, "x");
  const int64_t m = rows_of(x, k);
  std::vector<cpu::Lut4Weight> ws;
  std::vector<const void*> bptr;
  std::vector<DType> bts;
  std::vector<at::Tensor> keep(static_cast<size_t>(nw));
  for (int64_t j = 0; j < nw; ++j) {
    const std::optional<at::Tensor> b = bias.get(j);
    ws.push_back(make_lut4(packed[j], absmax[j], code[j], blocksize[j], out_features[j], k, absmax_code.get(j),
                           absmax_scale.get(j), absmax_offset[j], absmax_blocksize[j], op));
    check_bias(b, out_features[j], m, k, op);
    bts.push_back(bias_dtype(b, op));
    bptr.push_back(bias_data(b, keep[j]));
  }
  const std::vector<int64_t> out_shape = out_shape_of(x, total);
  if (m > 0 && total > 0 && k > 0 && m <= gemm_threshold(k, xt)) {
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty(out_shape, x.options());
    if (cpu::lut4_gemm_small_multi(ws.data(), nw, xc.data_ptr(), xt, m, bptr.data(), bts.data(), y.data_ptr()))
      return y;
  }
  std::vector<at::Tensor> parts;
  for (int64_t j = 0; j < nw; ++j)
    parts.push_back(lut4_linear_cpu(x, packed[j], absmax[j], code[j], blocksize[j], out_features[j], k, bias.get(j),
                                    absmax_code.get(j), absmax_scale.get(j), absmax_offset[j], absmax_blocksize[j]));
  return at::cat(parts, -1);
}

at::Tensor lut4_embedding_cpu(const at::Tensor& ids, const at::Tensor& packed, const at::Tensor& absmax,
                              const at::Tensor& code, int64_t blocksize, int64_t rows, int64_t cols,
                              const std::optional<at::Tensor>& absmax_code,
                              const std::optional<at::Tensor>& absmax_scale, double absmax_offset,
                              int64_t absmax_blocksize) {
  constexpr const char* op = "lut4_embedding";
  const cpu::Lut4Weight w = make_lut4(packed, absmax, code, blocksize, rows, cols, absmax_code, absmax_scale,
                                      absmax_offset, absmax_blocksize, op);
  return gather_rows(ids, rows, cols, op, [&](int64_t r, float* dst) { cpu::lut4_dequantize_rows(w, r, r + 1, dst); });
}

}  // namespace
}  // namespace ops
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("lut4_dequantize", &quantkit::ops::lut4_dequantize_cpu);
  m.impl("lut4_linear", &quantkit::ops::lut4_linear_cpu);
  m.impl("lut4_linear_multi", &quantkit::ops::lut4_linear_multi_cpu);
  m.impl("lut4_embedding", &quantkit::ops::lut4_embedding_cpu);
}
