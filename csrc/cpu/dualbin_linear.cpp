// dualbin (DB-LLM) CPU kernels: dequantize rows, and the masked-add GEMV / small GEMM.
//
// Per output row n and group g the product needs only two masked sums of x:
//
//     y[i, n] += a1[n, g] * sum_{k in g: b1[n,k] = 1} x[i, k] + a2[n, g] * sum_{k in g: b2 = 1} x[i, k]
//
// so the weight is never decoded: with AVX-512 every 16 plane bits ARE a __mmask16 and
//
//     s1 = _mm512_mask_add_ps(s1, bits1_16, s1, x[16])        (adds x where the bit is 1)
//
//     x row i  : | x0 .. x15 | x16 .. x31 | x32 .. x47 | x48 .. x63 |   one group of 64
//     plane 1  : |  16 bits  |  16 bits   |  16 bits   |  16 bits   |   = one uint64, LSB first
//                      \ mask      \ mask       \ mask       \ mask
//     s1 (16 lanes) += x where bit set;   s2 likewise with plane 2
//     end of group:  acc = fma(a1, s1, acc); acc = fma(a2, s2, acc); s1 = s2 = 0
//     end of row  :  y[i, n] = horizontal_sum(acc) + bias[n]
//
// The mask words are loaded once per block of up to 4 x rows (4 rows x (s1, s2, acc) =
// 12 zmm registers). x is first converted to fp32 and zero-padded to G*group columns,
// so a group never reads past the row and the tail needs no special case (padding bits
// are 0 and padded x is 0). Runtime dispatch: AVX-512F via a GCC `target` attribute and
// __builtin_cpu_supports (no -march=native), else a scalar loop. OpenMP (at::parallel_for)
// over output rows.
#include "cpu/dualbin_linear.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/isa.h"

namespace quantkit {
namespace cpu {
namespace {

// The masked-add kernel has only an AVX-512 variant: QUANTKIT_CPU_ISA=avx2 means scalar here.
bool use_avx512() {
  static const bool v = select_isa(/*avx2_needs_f16c=*/false) == Isa::Avx512;
  return v;
}

// 16 plane bits starting at element k0 (k0 % 16 == 0) of a row.
inline uint16_t bits16(const uint8_t* row,  // plane row, uint8 [row_bytes]
                       int64_t k0) {        // first element, a multiple of 16
  uint16_t v;
  std::memcpy(&v, row + k0 / 8, 2);  // little-endian: byte k0/8 holds elements k0 .. k0+7
  return v;
}

// ---------------------------------------------------------------------------------------
// Scalar reference-order kernel (any machine)
// ---------------------------------------------------------------------------------------
void rows_scalar(const DualBinWeight& w,  // packed weight
                 const float* xp,         // fp32 [m, kp] zero-padded activations
                 int64_t m,               // rows of x
                 int64_t kp,              // padded K = groups * group
                 int64_t n0, int64_t n1,  // output rows to compute
                 float* yf) {             // fp32 [m, N] (bias not added)
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p1 = w.plane1 + n * w.row_bytes;
    const uint8_t* p2 = w.plane2 + n * w.row_bytes;
    for (int64_t i = 0; i < m; ++i) {
      const float* xr = xp + i * kp;
      float acc = 0.f;
      for (int64_t g = 0; g < w.groups; ++g) {
        float s1 = 0.f, s2 = 0.f;
        for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k) {
          const int sh = static_cast<int>(k & 7);
          s1 += ((p1[k >> 3] >> sh) & 1) ? xr[k] : 0.f;
          s2 += ((p2[k >> 3] >> sh) & 1) ? xr[k] : 0.f;
        }
        acc += half_bits_to_float(w.alpha1[n * w.groups + g]) * s1 +
               half_bits_to_float(w.alpha2[n * w.groups + g]) * s2;
      }
      yf[i * w.rows + n] = acc;
    }
  }
}

#if QK_X86
// ---------------------------------------------------------------------------------------
// AVX-512 masked-add kernel: MB x rows (1..4) at a time share each mask load
// ---------------------------------------------------------------------------------------
template <int MB>
__attribute__((target("avx512f,f16c"))) void row_block_avx512(const DualBinWeight& w,  // packed weight
                                                         const float* xr,         // fp32 [MB, kp] x rows
                                                         int64_t kp,              // row stride of xr
                                                         int64_t n,               // output row
                                                         float* out) {            // fp32 [MB] results
  const uint8_t* p1 = w.plane1 + n * w.row_bytes;
  const uint8_t* p2 = w.plane2 + n * w.row_bytes;
  const uint16_t* a1 = w.alpha1 + n * w.groups;
  const uint16_t* a2 = w.alpha2 + n * w.groups;
  __m512 acc[MB];
  for (int r = 0; r < MB; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    __m512 s1[MB], s2[MB];
    for (int r = 0; r < MB; ++r) s1[r] = s2[r] = _mm512_setzero_ps();
    const int64_t k_end = (g + 1) * w.group;
    for (int64_t k = g * w.group; k < k_end; k += 16) {
      const __mmask16 m1 = bits16(p1, k);
      const __mmask16 m2 = bits16(p2, k);
      for (int r = 0; r < MB; ++r) {
        const __m512 xv = _mm512_loadu_ps(xr + r * kp + k);
        s1[r] = _mm512_mask_add_ps(s1[r], m1, s1[r], xv);
        s2[r] = _mm512_mask_add_ps(s2[r], m2, s2[r], xv);
      }
    }
    // hardware fp16 -> fp32 (vcvtph2ps, exact); c10::Half's portable conversion is ~20
    // integer ops, as much as the 64 weights' masked adds themselves
    const __m512 va1 = _mm512_set1_ps(_cvtsh_ss(a1[g]));
    const __m512 va2 = _mm512_set1_ps(_cvtsh_ss(a2[g]));
    for (int r = 0; r < MB; ++r) {
      acc[r] = _mm512_fmadd_ps(va1, s1[r], acc[r]);
      acc[r] = _mm512_fmadd_ps(va2, s2[r], acc[r]);
    }
  }
  for (int r = 0; r < MB; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// Whole 16-element chunks of one group [c, kend) -> o: per chunk, the level picked by the two
// mask words with three blends (no per-element bit extraction). Returns the first element
// not written (the scalar loop finishes a ragged tail).
__attribute__((target("avx512f"))) int64_t dequant_group_avx512(const uint8_t* p1,  // plane-1 row
                                                                 const uint8_t* p2,  // plane-2 row
                                                                 const float* lv,    // 4 levels, code order
                                                                 int64_t c,          // first element (16-aligned)
                                                                 int64_t kend,       // end of the group's real weights
                                                                 float* o) {         // fp32 output row
  const __m512 l0 = _mm512_set1_ps(lv[0]), l1 = _mm512_set1_ps(lv[1]);
  const __m512 l2 = _mm512_set1_ps(lv[2]), l3 = _mm512_set1_ps(lv[3]);
  for (; c + 16 <= kend; c += 16) {
    const __mmask16 m1 = bits16(p1, c), m2 = bits16(p2, c);
    const __m512 lo = _mm512_mask_blend_ps(m2, l0, l1);  // b1 = 0: 0 or a2
    const __m512 hi = _mm512_mask_blend_ps(m2, l2, l3);  // b1 = 1: a1 or a1 + a2
    _mm512_storeu_ps(o + c, _mm512_mask_blend_ps(m1, lo, hi));
  }
  return c;
}

__attribute__((target("avx512f,f16c"))) void rows_avx512(const DualBinWeight& w, const float* xp, int64_t m,
                                                    int64_t kp, int64_t n0, int64_t n1, float* yf) {
  float out[4];
  for (int64_t n = n0; n < n1; ++n) {
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
      row_block_avx512<4>(w, xp + i * kp, kp, n, out);
      for (int r = 0; r < 4; ++r) yf[(i + r) * w.rows + n] = out[r];
    }
    const int64_t rest = m - i;
    if (rest == 3) row_block_avx512<3>(w, xp + i * kp, kp, n, out);
    else if (rest == 2) row_block_avx512<2>(w, xp + i * kp, kp, n, out);
    else if (rest == 1) row_block_avx512<1>(w, xp + i * kp, kp, n, out);
    for (int r = 0; r < rest; ++r) yf[(i + r) * w.rows + n] = out[r];
  }
}
#endif

}  // namespace

const char* dualbin_cpu_isa() { return use_avx512() ? "avx512" : "scalar"; }

void dualbin_dequantize_rows(const DualBinWeight& w, int64_t r0, int64_t r1, float* out) {
  const int64_t k = w.cols;
  at::parallel_for(r0, r1, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      const uint8_t* p1 = w.plane1 + n * w.row_bytes;
      const uint8_t* p2 = w.plane2 + n * w.row_bytes;
      float* o = out + (n - r0) * k;
      for (int64_t g = 0; g < w.groups; ++g) {
        const float a1 = half_bits_to_float(w.alpha1[n * w.groups + g]);
        const float a2 = half_bits_to_float(w.alpha2[n * w.groups + g]);
        // the four levels, computed as the reference does: a1*b1 + a2*b2 with b in {0, 1}
        const float lv[4] = {a1 * 0.f + a2 * 0.f, a1 * 0.f + a2 * 1.f, a1 * 1.f + a2 * 0.f, a1 * 1.f + a2 * 1.f};
        const int64_t kend = std::min(k, (g + 1) * w.group);
        int64_t c = g * w.group;
#if QK_X86
        if (use_avx512()) c = dequant_group_avx512(p1, p2, lv, c, kend, o);
#endif
        for (; c < kend; ++c) {
          const int sh = static_cast<int>(c & 7);
          const int code = (((p1[c >> 3] >> sh) & 1) << 1) | ((p2[c >> 3] >> sh) & 1);
          o[c] = lv[code];
        }
      }
    }
  });
}

void dualbin_gemm_small(const DualBinWeight& w, const void* x, DType xt, int64_t m, const void* bias, DType bt,
                        void* y) {
  const int64_t k = w.cols, kp = w.groups * w.group, n = w.rows;
  // fp32, zero-padded copy of x: [m, kp] (a few KB to MB; reused by every output row)
  std::vector<float> xp(static_cast<size_t>(m * kp), 0.f);
  for (int64_t i = 0; i < m; ++i) {
    if (xt == DType::F32) std::memcpy(&xp[i * kp], static_cast<const float*>(x) + i * k, sizeof(float) * k);
    else for (int64_t c = 0; c < k; ++c) xp[i * kp + c] = load_as_float(x, xt, i * k + c);
  }
  std::vector<float> yf(static_cast<size_t>(m * n));
  // rows per task: enough work (~32K masked adds) to outweigh an OpenMP fork
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kp * m));
  at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
#if QK_X86
    if (use_avx512()) {
      rows_avx512(w, xp.data(), m, kp, n0, n1, yf.data());
      return;
    }
#endif
    rows_scalar(w, xp.data(), m, kp, n0, n1, yf.data());
  });
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < n; ++c) {
      const float v = yf[i * n + c] + (bias ? load_as_float(bias, bt, c) : 0.f);
      store_from_float(y, xt, i * n + c, v);
    }
}

}  // namespace cpu
}  // namespace quantkit
