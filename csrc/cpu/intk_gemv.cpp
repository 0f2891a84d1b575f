// int-k small-m product on AVX-512 (bits 1, 2, 4, 8): decode 16 packed bytes per step
// straight into fp32 vectors and FMA them into the x rows, no row buffer.
//
// Why a separate path: the generic kernel (intk_linear.cpp) decodes a whole row into a
// buffer and dots it afterwards, so every weight is written and re-read as fp32 (4 bytes
// per weight through L1) and the output head of an int8 model ran at fp32-GEMV speed.
//
// Layout recap (intk_linear.h): row r is a little-endian bitstream; with B bits dividing 8,
// byte j of the row holds codes j*P .. j*P+P-1 (P = 8/B), code p in bits [p*B, p*B+B).
// One step reads 16 bytes = 16*P codes. The 16 bytes are widened to 16 int32 lanes; phase p
// of lane j is code j*P + p. For B < 8 the code value minus the offset is looked up with
// one vpermps in a 16-entry table indexed by bits 3:0 of (lane >> p*B): the table holds
// (i & mask) - offset for i = 0..15, so the bits above the code need no masking. For B = 8
// the lane is converted to float and the offset subtracted (exact: offset is a half-integer
// and codes are < 256).
//
// x is rearranged once per call so that phase p of a step multiplies a contiguous 16-float
// vector: xa[c0 + 16p + j] = x[c0 + jP + p] for each full step starting at c0. The last
// K % (16P) columns are done in scalar code.
//
// Numerics: sum_k (code - offset) * x[k] in fp32, times the row's scale once at the end
// (the reference multiplies each weight by the scale first): equal up to rounding order.
#include "cpu/intk_gemv.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/isa.h"

namespace quantkit {
namespace cpu {
namespace {

bool has_avx512() {
  static const bool v = select_isa(/*avx2_needs_f16c=*/false) == Isa::Avx512;
  return v;
}

// Column at which the scalar tail starts (a multiple of the step width 16 * 8 / bits).
int64_t full_cols(int64_t k, int bits) {
  const int64_t step = 16 * (8 / bits);
  return k / step * step;
}

// xa [m, kf] = x's first kf columns of each row in step order (see top); kf = full_cols.
void arrange_x(const float* x, int64_t m, int64_t k, int bits, float* xa) {
  const int per = 8 / bits;
  const int64_t step = 16 * per, kf = full_cols(k, bits);
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * k;
    float* ai = xa + i * kf;
    for (int64_t c0 = 0; c0 < kf; c0 += step)
      for (int p = 0; p < per; ++p)
        for (int j = 0; j < 16; ++j) ai[c0 + 16 * p + j] = xi[c0 + j * per + p];
  }
}

// sum over tail columns [kf, k) of (code - offset) * x[c], one row r, one x row.
float tail_dot(const IntKWeight& w, int64_t r, int64_t kf, const float* xi) {
  const uint8_t* row = w.packed + r * w.row_bytes;
  const int b = w.bits, per = 8 / b;
  const unsigned mask = (1u << b) - 1u;
  float s = 0.f;
  for (int64_t c = kf; c < w.cols; ++c) {
    const unsigned code = (row[c / per] >> ((c % per) * b)) & mask;
    s += (static_cast<float>(code) - w.offset) * xi[c];
  }
  return s;
}

#if QK_X86
// R weight rows (r0 .. r0+R-1) times M x rows over the full steps; out[ri][i] = partial dot.
// R > 1 at small M gives the FMA chains independent accumulators (one chain per row and x
// row), which is what keeps m = 1 from being FMA-latency bound.
template <int B, int M, int R>
__attribute__((target("avx512f"))) void rows_avx512(const IntKWeight& w, int64_t r0, const float* xa, int64_t kf,
                                                     float (&out)[R][M]) {
  constexpr int P = 8 / B;
  constexpr int64_t kStep = 16 * P;
  __m512 tab = _mm512_setzero_ps();
  if (B < 8) {
    alignas(64) float t[16];
    for (int i = 0; i < 16; ++i) t[i] = static_cast<float>(i & ((1 << B) - 1)) - w.offset;
    tab = _mm512_load_ps(t);
  }
  const __m512 off = _mm512_set1_ps(w.offset);
  __m512 acc[R][M];
  for (int ri = 0; ri < R; ++ri)
    for (int i = 0; i < M; ++i) acc[ri][i] = _mm512_setzero_ps();
  const uint8_t* rows[R];
  for (int ri = 0; ri < R; ++ri) rows[ri] = w.packed + (r0 + ri) * w.row_bytes;
  for (int64_t c0 = 0, byte = 0; c0 < kf; c0 += kStep, byte += 16) {
    for (int ri = 0; ri < R; ++ri) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[ri] + byte)));
      for (int p = 0; p < P; ++p) {
        __m512 wv;
        if (B == 8) wv = _mm512_sub_ps(_mm512_cvtepi32_ps(v), off);
        else wv = _mm512_permutexvar_ps(p == 0 ? v : _mm512_srli_epi32(v, p * B), tab);
        for (int i = 0; i < M; ++i)
          acc[ri][i] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xa + i * kf + c0 + 16 * p), acc[ri][i]);
      }
    }
  }
  for (int ri = 0; ri < R; ++ri)
    for (int i = 0; i < M; ++i) out[ri][i] = _mm512_reduce_add_ps(acc[ri][i]);
}

template <int B, int M>
void gemm_avx512(const IntKWeight& w, const float* x, const float* xa, const float* bias, float* y, int64_t ldy) {
  constexpr int R = M == 1 ? 4 : (M == 2 ? 2 : 1);
  const int64_t n = w.rows, k = w.cols, kf = full_cols(k, B);
  // ~64 KB of packed weight per task: large enough that the fork (~5 us) is amortised.
  const int64_t grain = std::max<int64_t>(R, (65536 / std::max<int64_t>(w.row_bytes, 1)) / R * R);
  at::parallel_for(0, n, grain, [&](int64_t a, int64_t e) {
    float part[R][M];
    int64_t r = a;
    auto finish = [&](int64_t row, const float* p) {
      const float s = w.scale[row], b = bias ? bias[row] : 0.f;
      for (int i = 0; i < M; ++i) y[i * ldy + row] = (p[i] + tail_dot(w, row, kf, x + i * k)) * s + b;
    };
    for (; r + R <= e; r += R) {
      rows_avx512<B, M, R>(w, r, xa, kf, part);
      for (int ri = 0; ri < R; ++ri) finish(r + ri, part[ri]);
    }
    for (; r < e; ++r) {
      float one[1][M];
      rows_avx512<B, M, 1>(w, r, xa, kf, one);
      finish(r, one[0]);
    }
  });
}

template <int B>
void gemm_bits(const IntKWeight& w, const float* x, int64_t m, const float* xa, const float* bias, float* y) {
  const int64_t n = w.rows, k = w.cols, kf = full_cols(k, B);
  // x rows in groups of at most 4 (accumulators: R * M <= 4 per row group keeps 16 zmm
  // for x loads and the table); y rows of a group are written with stride n.
  for (int64_t i0 = 0; i0 < m; i0 += 4) {
    const int64_t g = std::min<int64_t>(4, m - i0);
    const float* xg = x + i0 * k;
    const float* ag = xa + i0 * kf;
    float* yg = y + i0 * n;
    switch (g) {
      case 1: gemm_avx512<B, 1>(w, xg, ag, bias, yg, n); break;
      case 2: gemm_avx512<B, 2>(w, xg, ag, bias, yg, n); break;
      case 3: gemm_avx512<B, 3>(w, xg, ag, bias, yg, n); break;
      default: gemm_avx512<B, 4>(w, xg, ag, bias, yg, n); break;
    }
  }
}
#endif

}  // namespace

bool intk_gemv_supported(const IntKWeight& w) {
#if QK_X86
  return has_avx512() && (w.bits == 1 || w.bits == 2 || w.bits == 4 || w.bits == 8);
#else
  (void)w;
  return false;
#endif
}

void intk_gemv_avx512(const IntKWeight& w, const float* x, int64_t m, const float* bias, float* y) {
#if QK_X86
  const int64_t kf = full_cols(w.cols, w.bits);
  std::vector<float> xa_buf;
  const float* xa = x;
  if (w.bits != 8) {  // 8 bits: one code per byte, x is already in step order
    xa_buf.resize(static_cast<size_t>(m * kf));
    arrange_x(x, m, w.cols, w.bits, xa_buf.data());
    xa = xa_buf.data();
  } else if (kf != w.cols && m > 1) {
    // rows of xa must be kf apart: copy the full-step part of each x row
    xa_buf.resize(static_cast<size_t>(m * kf));
    for (int64_t i = 0; i < m; ++i) std::copy(x + i * w.cols, x + i * w.cols + kf, xa_buf.data() + i * kf);
    xa = xa_buf.data();
  }
  switch (w.bits) {
    case 8: return gemm_bits<8>(w, x, m, xa, bias, y);
    case 4: return gemm_bits<4>(w, x, m, xa, bias, y);
    case 2: return gemm_bits<2>(w, x, m, xa, bias, y);
    default: return gemm_bits<1>(w, x, m, xa, bias, y);
  }
#else
  (void)w, (void)x, (void)m, (void)bias, (void)y;
#endif
}

}  // namespace cpu
}  // namespace quantkit
