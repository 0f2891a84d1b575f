// BitStack CPU kernels: decode GEMV without rebuilding the dense weight, and the sign
// application used by the rebuild (large-batch) path. Layout: see bitstack_linear.h.
//
// Decode math. With W = sum_i S_i (.) (u_i v_i) and Z_i = v_i diag(x) (k x n),
//     y_r = sum_i sum_j u_i[r, j] * sum_c S_i[r, c] * Z_i[j, c].
// The inner sum is a +/-1 row times Z_i^T. Cut the columns into groups of 4: a group's
// 4 signs are one nibble of the packed row, so precompute, per group g, the 16 possible
// signed sums of Z's 4 columns (each a k-vector):
//     T_g[idx] = sum_{t<4} (bit (3-t) of idx ? +1 : -1) * Z[:, 4g+t]
// and a row becomes n/4 table lookups plus k-vector adds, then one k-wide dot with u_i[r].
//
//     packed row r:  | byte 0        | byte 1        | ...
//                    | hi     lo     | hi     lo     |
//     columns        | 0..3   4..7   | 8..11  12..15 |
//     table          | T_0    T_1    | T_2    T_3    |   T_g: 16 x k fp32
//
// Cost per token and block: building the tables is 16 k-vector ops per 4 columns
// (4 n k flops, independent of m); the rows are m n / 4 k-vector adds. A byte-wide
// (256-entry) table would halve the row work but cost 256 ops per 8 columns, which only
// pays for m > ~1800 (m/8 + 256 < m/4 + 32): not for SmolLM-sized layers, so 4-column
// groups it is. With k = 16 a k-vector is exactly one AVX-512 register.
//
// Runtime ISA dispatch (GCC target attributes, like lut4_linear.cpp): AVX-512F,
// AVX2+FMA+F16C, scalar; QUANTKIT_CPU_ISA=avx2|scalar lowers the choice (tests).
#include "cpu/bitstack_linear.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/isa.h"

namespace quantkit {
namespace cpu {
namespace {

// avx2 here needs AVX2 + FMA + F16C (the fp16 -> fp32 converts of u and v).
Isa isa() {
  static const Isa v = select_isa(/*avx2_needs_f16c=*/true);
  return v;
}

// ---- fp16 -> fp32 of u and v, once per call (scalar c10::Half is ~10x slower) ----------
void half_to_float_scalar(const uint16_t* src, int64_t count, float* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = half_bits_to_float(src[i]);
}
#if QK_X86
__attribute__((target("avx512f"))) void half_to_float_avx512(const uint16_t* src, int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  half_to_float_scalar(src + i, count - i, dst + i);
}
__attribute__((target("avx2,f16c"))) void half_to_float_avx2(const uint16_t* src, int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  half_to_float_scalar(src + i, count - i, dst + i);
}
#endif

void half_to_float(const uint16_t* src, int64_t count, float* dst) {
  const int64_t grain = 1 << 16;
  at::parallel_for(0, count, grain, [&](int64_t a, int64_t b) {
#if QK_X86
    if (isa() == Isa::Avx512) return half_to_float_avx512(src + a, b - a, dst + a);
    if (isa() == Isa::Avx2) return half_to_float_avx2(src + a, b - a, dst + a);
#endif
    half_to_float_scalar(src + a, b - a, dst + a);
  });
}

// ---- int8 factors -> fp32 once per call; u takes the per-(block, component) scale -------
void int8_factors_to_float(const BitStackWeight& w, float* uf, float* vf) {
  const int64_t b = w.b, m = w.m, n = w.n, k = w.k;
  at::parallel_for(0, b * m, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, k)), [&](int64_t a, int64_t e) {
    for (int64_t row = a; row < e; ++row) {
      const float* sc = w.scale + (row / m) * k;
      for (int64_t j = 0; j < k; ++j) uf[row * k + j] = static_cast<float>(w.u8[row * k + j]) * sc[j];
    }
  });
  at::parallel_for(0, b * k * n, 1 << 16, [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i) vf[i] = static_cast<float>(w.v8[i]);
  });
}

// ---- table build: T_g for groups [g0, g1) of one block -----------------------------------
// K = k when known at compile time (16: one zmm per k-vector), 0 = runtime k.
template <int K>
__attribute__((always_inline)) inline void build_tables(
    const float* vf,   // fp32 [k, n] = v_i
    const float* xf,   // fp32 [n] activations of this token
    int64_t n,         // columns
    int64_t k_rt,      // rank (used when K == 0)
    int64_t g0,        // first 4-column group
    int64_t g1,        // end group
    float* z,          // scratch fp32 [4, k]
    float* lut) {      // fp32 [n4, 16, k] tables of this block
  const int64_t k = K ? K : k_rt;
  for (int64_t g = g0; g < g1; ++g) {
    // Z columns 4g..4g+3 (zero past n: padding bits are 0, i.e. "-1", times 0)
    for (int t = 0; t < 4; ++t) {
      const int64_t c = 4 * g + t;
      float* zt = z + t * k;
      if (c < n) {
        const float xc = xf[c];
        for (int64_t j = 0; j < k; ++j) zt[j] = vf[j * n + c] * xc;
      } else {
        for (int64_t j = 0; j < k; ++j) zt[j] = 0.0f;
      }
    }
    float* T = lut + g * 16 * k;
    for (int64_t j = 0; j < k; ++j) T[j] = -((z[j] + z[k + j]) + (z[2 * k + j] + z[3 * k + j]));
    // Flip one sign at a time: idx differs from idx ^ low in the bit of column t = 3 - p.
    for (int idx = 1; idx < 16; ++idx) {
      const int p = __builtin_ctz(idx);
      const float* src = T + (idx ^ (1 << p)) * k;
      const float* zc = z + (3 - p) * k;
      float* dst = T + idx * k;
      for (int64_t j = 0; j < k; ++j) dst[j] = src[j] + 2.0f * zc[j];
    }
  }
}

// ---- rows [r0, r1): lookups + k-wide dot with u ------------------------------------------
template <int K>
__attribute__((always_inline)) inline void rows_generic(const BitStackWeight& w, const float* lut, const float* uf,
                                                        int64_t r0, int64_t r1, float* acc, float* out) {
  const int64_t k = K ? K : w.k, m = w.m, nbytes = (w.n + 7) / 8, lut_block = 2 * nbytes * 16 * k;
  for (int64_t r = r0; r < r1; ++r) {
    float total = 0.0f;
    for (int64_t i = 0; i < w.b; ++i) {
      const uint8_t* s = w.signs + (i * m + r) * nbytes;
      const float* L = lut + i * lut_block;
      for (int64_t j = 0; j < k; ++j) acc[j] = 0.0f;
      for (int64_t q = 0; q < nbytes; ++q) {
        const float* hi = L + (2 * q * 16 + (s[q] >> 4)) * k;
        const float* lo = L + ((2 * q + 1) * 16 + (s[q] & 15)) * k;
        for (int64_t j = 0; j < k; ++j) acc[j] += hi[j] + lo[j];
      }
      const float* ur = uf + (i * m + r) * k;
      for (int64_t j = 0; j < k; ++j) total += ur[j] * acc[j];
    }
    out[r] = total;
  }
}

#if QK_X86
// Row tiles x byte chunks, so the tables a chunk needs (kChunkBytes * 2 groups * 16 entries
// * 64 B = 16 KB) stay in L1 while a tile of rows walks them; each row's running k-vector
// is parked in acc (kRowTile * 64 B) between chunks. Without tiling every lookup came from
// L2 (the tables of one block are n/4 KB) and the kernel ran at L2 bandwidth (measured
// ~3x slower on 1536x576).
constexpr int64_t kRowTile = 64;
constexpr int64_t kChunkBytes = 8;

// k = 16: a k-vector is one zmm; two accumulators break the add dependency chain.
__attribute__((target("avx512f"))) void rows_k16_avx512(const BitStackWeight& w, const float* lut, const float* uf,
                                                        int64_t r0, int64_t r1, float* out) {
  const int64_t m = w.m, nbytes = (w.n + 7) / 8, lut_block = 2 * nbytes * 16 * 16;
  alignas(64) float acc[kRowTile * 16];
  for (int64_t r = r0; r < r1; ++r) out[r] = 0.0f;
  for (int64_t i = 0; i < w.b; ++i) {
    const float* L = lut + i * lut_block;
    for (int64_t t0 = r0; t0 < r1; t0 += kRowTile) {
      const int64_t t1 = std::min(r1, t0 + kRowTile);
      for (int64_t r = t0; r < t1; ++r) _mm512_store_ps(acc + (r - t0) * 16, _mm512_setzero_ps());
      for (int64_t q0 = 0; q0 < nbytes; q0 += kChunkBytes) {
        const int64_t q1 = std::min(nbytes, q0 + kChunkBytes);
        for (int64_t r = t0; r < t1; ++r) {
          const uint8_t* s = w.signs + (i * m + r) * nbytes;
          __m512 a0 = _mm512_load_ps(acc + (r - t0) * 16), a1 = _mm512_setzero_ps();
          for (int64_t q = q0; q < q1; ++q) {
            const unsigned byte = s[q];
            a0 = _mm512_add_ps(a0, _mm512_loadu_ps(L + (2 * q * 16 + (byte >> 4)) * 16));
            a1 = _mm512_add_ps(a1, _mm512_loadu_ps(L + ((2 * q + 1) * 16 + (byte & 15)) * 16));
          }
          _mm512_store_ps(acc + (r - t0) * 16, _mm512_add_ps(a0, a1));
        }
      }
      for (int64_t r = t0; r < t1; ++r)
        out[r] += _mm512_reduce_add_ps(_mm512_mul_ps(_mm512_loadu_ps(uf + (i * m + r) * 16),
                                                     _mm512_load_ps(acc + (r - t0) * 16)));
    }
  }
}

__attribute__((target("avx2,fma"))) void rows_k16_avx2(const BitStackWeight& w, const float* lut, const float* uf,
                                                       int64_t r0, int64_t r1, float* out) {
  const int64_t m = w.m, nbytes = (w.n + 7) / 8, lut_block = 2 * nbytes * 16 * 16;
  for (int64_t r = r0; r < r1; ++r) {
    __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
    for (int64_t i = 0; i < w.b; ++i) {
      const uint8_t* s = w.signs + (i * m + r) * nbytes;
      const float* L = lut + i * lut_block;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      for (int64_t q = 0; q < nbytes; ++q) {
        const unsigned byte = s[q];
        const float* hi = L + (2 * q * 16 + (byte >> 4)) * 16;
        const float* lo = L + ((2 * q + 1) * 16 + (byte & 15)) * 16;
        a0 = _mm256_add_ps(a0, _mm256_add_ps(_mm256_loadu_ps(hi), _mm256_loadu_ps(lo)));
        a1 = _mm256_add_ps(a1, _mm256_add_ps(_mm256_loadu_ps(hi + 8), _mm256_loadu_ps(lo + 8)));
      }
      const float* ur = uf + (i * m + r) * 16;
      t0 = _mm256_fmadd_ps(_mm256_loadu_ps(ur), a0, t0);
      t1 = _mm256_fmadd_ps(_mm256_loadu_ps(ur + 8), a1, t1);
    }
    alignas(32) float buf[8];
    _mm256_store_ps(buf, _mm256_add_ps(t0, t1));
    out[r] = ((buf[0] + buf[1]) + (buf[2] + buf[3])) + ((buf[4] + buf[5]) + (buf[6] + buf[7]));
  }
}

__attribute__((target("avx512f"))) void build_tables_avx512(const float* vf, const float* xf, int64_t n, int64_t k,
                                                            int64_t g0, int64_t g1, float* z, float* lut) {
  if (k == 16) return build_tables<16>(vf, xf, n, k, g0, g1, z, lut);
  build_tables<0>(vf, xf, n, k, g0, g1, z, lut);
}
__attribute__((target("avx2,fma"))) void build_tables_avx2(const float* vf, const float* xf, int64_t n, int64_t k,
                                                           int64_t g0, int64_t g1, float* z, float* lut) {
  if (k == 16) return build_tables<16>(vf, xf, n, k, g0, g1, z, lut);
  build_tables<0>(vf, xf, n, k, g0, g1, z, lut);
}
__attribute__((target("avx512f"))) void rows_any_avx512(const BitStackWeight& w, const float* lut, const float* uf,
                                                        int64_t r0, int64_t r1, float* acc, float* out) {
  rows_generic<0>(w, lut, uf, r0, r1, acc, out);
}
__attribute__((target("avx2,fma"))) void rows_any_avx2(const BitStackWeight& w, const float* lut, const float* uf,
                                                       int64_t r0, int64_t r1, float* acc, float* out) {
  rows_generic<0>(w, lut, uf, r0, r1, acc, out);
}
#endif

void build_tables_dispatch(const float* vf, const float* xf, int64_t n, int64_t k, int64_t g0, int64_t g1, float* z,
                           float* lut) {
#if QK_X86
  if (isa() == Isa::Avx512) return build_tables_avx512(vf, xf, n, k, g0, g1, z, lut);
  if (isa() == Isa::Avx2) return build_tables_avx2(vf, xf, n, k, g0, g1, z, lut);
#endif
  if (k == 16) return build_tables<16>(vf, xf, n, k, g0, g1, z, lut);
  build_tables<0>(vf, xf, n, k, g0, g1, z, lut);
}

void rows_dispatch(const BitStackWeight& w, const float* lut, const float* uf, int64_t r0, int64_t r1, float* acc,
                   float* out) {
#if QK_X86
  if (isa() == Isa::Avx512) {
    if (w.k == 16) return rows_k16_avx512(w, lut, uf, r0, r1, out);
    return rows_any_avx512(w, lut, uf, r0, r1, acc, out);
  }
  if (isa() == Isa::Avx2) {
    if (w.k == 16) return rows_k16_avx2(w, lut, uf, r0, r1, out);
    return rows_any_avx2(w, lut, uf, r0, r1, acc, out);
  }
#endif
  if (w.k == 16) return rows_generic<16>(w, lut, uf, r0, r1, acc, out);
  rows_generic<0>(w, lut, uf, r0, r1, acc, out);
}

}  // namespace

const char* bitstack_cpu_isa() { return isa_name(isa()); }

void bitstack_gemv(const BitStackWeight& w, const void* x, DType xt, int64_t rows, const void* bias, DType bt,
                   void* y) {
  const int64_t b = w.b, m = w.m, n = w.n, k = w.k;
  const int64_t nbytes = (n + 7) / 8, n4 = 2 * nbytes;
  // fp32 copies of u and v for this call (reused by every token; int8 factors times scale). Scratch lives in
  // thread_local vectors that only grow, so a decode step neither page-faults nor zeroes
  // ~1 MB of tables per call (measured: that alone doubled the time of a 1536x576 GEMV).
  static thread_local std::vector<float> uf, vf, xf, lut, yf;
  auto grow = [](std::vector<float>& buf, int64_t count) {
    if (static_cast<int64_t>(buf.size()) < count) buf.resize(count);
  };
  grow(uf, b * m * k);
  grow(vf, b * k * n);
  grow(xf, n);
  grow(lut, b * n4 * 16 * k);
  grow(yf, m);
  // Raw pointers: inside the parallel regions a thread_local name would denote the worker's
  // own (empty) vector, not this thread's.
  float* const ufp = uf.data();
  float* const vfp = vf.data();
  float* const xfp = xf.data();
  float* const lutp = lut.data();
  float* const yfp = yf.data();
  if (w.scale != nullptr) {
    int8_factors_to_float(w, ufp, vfp);
  } else {
    half_to_float(w.u, b * m * k, ufp);
    half_to_float(w.v, b * k * n, vfp);
  }
  const int64_t groups = b * n4;
  const int64_t group_grain = std::max<int64_t>(1, 4096 / (16 * k));
  const int64_t row_grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, b * nbytes * 2));
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t c = 0; c < n; ++c) xfp[c] = load_as_float(x, xt, t * n + c);
    at::parallel_for(0, groups, group_grain, [&](int64_t a, int64_t e) {
      std::vector<float> z(4 * k);
      // a chunk may straddle blocks: split it per block
      while (a < e) {
        const int64_t i = a / n4, g0 = a % n4, g1 = std::min<int64_t>(n4, g0 + (e - a));
        build_tables_dispatch(vfp + i * k * n, xfp, n, k, g0, g1, z.data(), lutp + i * n4 * 16 * k);
        a += g1 - g0;
      }
    });
    at::parallel_for(0, m, row_grain, [&](int64_t r0, int64_t r1) {
      std::vector<float> acc(k);
      rows_dispatch(w, lutp, ufp, r0, r1, acc.data(), yfp);
    });
    for (int64_t r = 0; r < m; ++r) {
      float v = yfp[r];
      if (bias) v += load_as_float(bias, bt, r);
      store_from_float(y, xt, t * m + r, v);
    }
  }
}

void bitstack_apply_signs(const uint8_t* signs, const float* uv, int64_t m, int64_t n, bool first, float* out) {
  const int64_t nbytes = (n + 7) / 8;
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* s = signs + r * nbytes;
      const float* src = uv + r * n;
      float* dst = out + r * n;
      for (int64_t c = 0; c < n; ++c) {
        // branch-free: flip the fp32 sign bit where the packed bit is 0 (-1)
        const uint32_t bit = (s[c >> 3] >> (7 - (c & 7))) & 1u;
        uint32_t u;
        std::memcpy(&u, src + c, 4);
        u ^= (bit ^ 1u) << 31;
        float v;
        std::memcpy(&v, &u, 4);
        dst[c] = first ? v : dst[c] + v;
      }
    }
  });
}

}  // namespace cpu
}  // namespace quantkit
