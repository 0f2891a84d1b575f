// lut4 (nf4/fp4) CPU kernels: dequantize, and fused decode + GEMV / small-batch GEMM.
//
// Format (bitsandbytes): the [N, K] weight is flattened row-major and cut into blocks of
// `blocksize` consecutive elements (blocks may span rows; the last may be partial). Each
// element is a 4-bit index into a 16-entry fp32 table; element 2i sits in the HIGH nibble
// of byte i, element 2i+1 in the low nibble. w = code[idx] * absmax[block] in fp32.
//
// Vectorisation without -march=native: every hot function exists in an AVX-512F, an
// AVX2+FMA and a plain C++ version (GCC `target` attributes); one is picked at runtime
// with __builtin_cpu_supports, so the wheel runs on any x86-64 (and non-x86 builds get
// the scalar code only).
//
// Numerics: the block scale is folded into the 16-entry table once per block
// (table = code * scale), so every decoded weight is exactly the fp32 product the
// reference computes; only the summation order of the dot products differs. (The bf16/fp16
// row dequantize then rounds those fp32 values exactly as Tensor.to does.) This file
// must be compiled with -ffp-contract=off so that GCC never fuses the double-quant decode
// (absmax_code[q] * scale + offset) into an FMA, which would break bit-exactness.
#include "lut4_linear.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/isa.h"

namespace quantkit {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------
// Small helpers shared by every ISA
// ---------------------------------------------------------------------------------------

// fp32 scale of block b. Double quant is decoded here, once per block, so no separate
// pass over absmax or the weight is needed. mul then add (never an FMA: see top).
inline float block_scale(const Lut4Weight& w,  // packed weight
                         int64_t b) {          // block index over the flattened weight
  if (w.absmax_f32) return w.absmax_f32[b];
  const float q = w.absmax_code[w.absmax_u8[b]];
  const int64_t nested = w.absmax_blocksize_log2 >= 0 ? (b >> w.absmax_blocksize_log2) : b / w.absmax_blocksize;
  const float s = w.absmax_scale[nested];
  const float prod = q * s;
  return prod + w.absmax_offset;
}

// Block index of flat element f.
inline int64_t block_of(const Lut4Weight& w, int64_t f) {
  return w.blocksize_log2 >= 0 ? (f >> w.blocksize_log2) : f / w.blocksize;
}

int log2_or_neg(int64_t v) {
  if (v <= 0 || (v & (v - 1))) return -1;
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

Lut4Weight with_derived(const Lut4Weight& w) {
  Lut4Weight d = w;
  d.blocksize_log2 = log2_or_neg(w.blocksize);
  d.absmax_blocksize_log2 = log2_or_neg(w.absmax_blocksize);
  return d;
}

// Scalar decode of flat elements [f0, f1) into out[0 .. f1-f0). Handles any alignment
// (rows starting in the middle of a byte, blocks spanning rows, partial last block).
void dequant_range_scalar(const Lut4Weight& w,  // packed weight
                          int64_t f0,           // first flat element index
                          int64_t f1,           // one past the last flat element index
                          float* out) {         // fp32 [f1 - f0]
  if (f0 >= f1) return;
  const int64_t bs = w.blocksize;
  int64_t b = f0 / bs;
  int64_t bend = (b + 1) * bs;
  float sc = block_scale(w, b);
  for (int64_t f = f0; f < f1; ++f) {
    if (f == bend) {
      ++b;
      bend += bs;
      sc = block_scale(w, b);
    }
    const uint8_t byte = w.packed[f >> 1];
    const int idx = (f & 1) ? (byte & 0xF) : (byte >> 4);
    out[f - f0] = w.code[idx] * sc;
  }
}

// ---------------------------------------------------------------------------------------
// Runtime ISA selection
// ---------------------------------------------------------------------------------------
// avx2 here needs AVX2 + FMA.
Isa isa() {
  static const Isa v = select_isa(/*avx2_needs_f16c=*/false);
  return v;
}

// AVX-512BW (vpermw) for the direct 16-bit dequantize; every AVX-512 x86 since Skylake-SP.
bool has_avx512bw() {
#if QK_X86
  static const bool v = isa() == Isa::Avx512 && __builtin_cpu_supports("avx512bw");
  return v;
#else
  return false;
#endif
}

// Per-thread work sizes: enough rows that an OpenMP task outweighs its fork cost (~5 us).
int64_t row_grain(int64_t k, int64_t m) {
  const int64_t work = std::max<int64_t>(1, k * std::max<int64_t>(m, 1));
  return std::max<int64_t>(1, 32768 / work);
}

// ---------------------------------------------------------------------------------------
// Activation preparation
// ---------------------------------------------------------------------------------------
// Fast paths decode 2G weights per step (G = vector width in floats: 16 for AVX-512, 8 for
// AVX2) from G bytes: the high nibbles are the even elements, the low nibbles the odd
// ones. Storing x per 2G-chunk as [G evens | G odds] lets both halves multiply against a
// plain contiguous vector load, so no shuffles are spent on x in the inner loop.
void prepare_x(const void* x,   // [m, K] activations of type xt
               DType xt,        // dtype of x
               int64_t m,       // rows of x
               int64_t k,       // K
               int g,           // group width G, or 0 for plain (unarranged) fp32
               float* xa) {     // fp32 [m, K] output (arranged when g > 0)
  at::parallel_for(0, m, std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t base = i * k;
      if (g == 0) {
        if (xt == DType::F32) {
          std::memcpy(xa + base, static_cast<const float*>(x) + base, sizeof(float) * k);
        } else {
          for (int64_t c = 0; c < k; ++c) xa[base + c] = load_as_float(x, xt, base + c);
        }
        continue;
      }
      for (int64_t c0 = 0; c0 < k; c0 += 2 * g) {
        for (int j = 0; j < g; ++j) {
          xa[base + c0 + j] = load_as_float(x, xt, base + c0 + 2 * j);
          xa[base + c0 + g + j] = load_as_float(x, xt, base + c0 + 2 * j + 1);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Scalar / generic path: decode one weight row into a buffer, then dot with each x row.
// Used for every shape on non-AVX2 machines and, on AVX machines, for shapes where a row
// does not start on a 32-element boundary (K % 32 != 0) or blocksize % 32 != 0.
// ---------------------------------------------------------------------------------------
float dot_scalar(const float* a, const float* b, int64_t k) {
  // 4 partial sums: gives the compiler independent chains even without vectorisation.
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int64_t c = 0;
  for (; c + 4 <= k; c += 4) {
    s0 += a[c] * b[c];
    s1 += a[c + 1] * b[c + 1];
    s2 += a[c + 2] * b[c + 2];
    s3 += a[c + 3] * b[c + 3];
  }
  for (; c < k; ++c) s0 += a[c] * b[c];
  return (s0 + s1) + (s2 + s3);
}

#if QK_X86
__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t k) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= k; c += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c + 8), _mm256_loadu_ps(b + c + 8), s1);
  }
  for (; c + 8 <= k; c += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), s0);
  s0 = _mm256_add_ps(s0, s1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float s = _mm_cvtss_f32(h);
  for (; c < k; ++c) s += a[c] * b[c];
  return s;
}

__attribute__((target("avx512f"))) float dot_avx512(const float* a, const float* b, int64_t k) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= k; c += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 16), _mm512_loadu_ps(b + c + 16), s1);
  }
  for (; c < k; c += 16) {  // masked tail: no scalar remainder loop
    const __mmask16 mk = (k - c >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - c)) - 1);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, a + c), _mm512_maskz_loadu_ps(mk, b + c), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
#endif

void gemm_generic(const Lut4Weight& w,  // packed weight [N, K]
                  const float* xf,      // fp32 [m, K] plain layout
                  int64_t m,            // rows of x
                  const void* bias,     // [N] or nullptr
                  DType bt,             // bias dtype
                  void* y,              // [m, N] output
                  DType yt,             // output dtype
                  Isa use) {            // which dot product to use
  const int64_t n_out = w.rows, k = w.cols;
  at::parallel_for(0, n_out, row_grain(k, m), [&](int64_t n0, int64_t n1) {
    std::vector<float> row(static_cast<size_t>(k));
    for (int64_t n = n0; n < n1; ++n) {
      dequant_range_scalar(w, n * k, (n + 1) * k, row.data());
      const float bv = bias ? load_as_float(bias, bt, n) : 0.f;
      for (int64_t i = 0; i < m; ++i) {
        float s;
#if QK_X86
        if (use == Isa::Avx512) s = dot_avx512(row.data(), xf + i * k, k);
        else if (use == Isa::Avx2) s = dot_avx2(row.data(), xf + i * k, k);
        else s = dot_scalar(row.data(), xf + i * k, k);
#else
        (void)use;
        s = dot_scalar(row.data(), xf + i * k, k);
#endif
        store_from_float(y, yt, i * n_out + n, s + bv);
      }
    }
  });
}

#if QK_X86
// ---------------------------------------------------------------------------------------
// Fast paths (K % 32 == 0 and blocksize % 32 == 0: every row and every 32-element chunk
// starts on a byte boundary and lies inside one block).
//
// Work is tiled as (row tile) x (K tile) x (group of x rows) x (weight row):
//  * a K tile of the group's x rows stays in L1 while weight rows stream past it (each
//    32-weight step reads 2*M x vectors; from L2 the FMAs would starve);
//  * a (row tile, K tile) piece of the weight stays in L2 while every group passes, so the
//    weight is read from DRAM once per call;
//  * partial sums are kept as vectors in `pv` across K tiles and reduced horizontally once
//    per output, not once per tile (a reduction costs as much as several decode steps).
// ---------------------------------------------------------------------------------------
constexpr int64_t kMaxTileK = 12288;                      // elements of K per tile, at most
constexpr int64_t kMaxTileBlocks = kMaxTileK / 32 + 2;   // blocks a K tile can touch

// Decoded fp32 scales of the blocks covering row elements [k0, k1) of the row starting at
// flat element flat0, into sc[0..]; returns the first block's index. Done up front so the
// hot loop needs one broadcast load per block instead of the double-quant decode.
inline int64_t tile_scales(const Lut4Weight& w,  // packed weight
                           int64_t flat0,        // flat index of the row's first element
                           int64_t k0,           // tile start within the row
                           int64_t k1,           // tile end within the row (> k0)
                           float* sc) {          // fp32 [kMaxTileBlocks] output
  const int64_t b0 = block_of(w, flat0 + k0), b1 = block_of(w, flat0 + k1 - 1);
  if (w.absmax_f32) {
    for (int64_t b = b0; b <= b1; ++b) sc[b - b0] = w.absmax_f32[b];
  } else {
    for (int64_t b = b0; b <= b1; ++b) sc[b - b0] = block_scale(w, b);
  }
  return b0;
}

// One decode step: 32 weights starting at row element cc, multiplied into M accumulators.
// vpmovzxbd widens 16 bytes to 16 int32 lanes; vpermps uses only bits 3:0 of each lane,
// so the lanes themselves index the low nibbles (odd elements) and lanes >> 4 the high
// nibbles (even elements) without masking. The 16-entry table (code times the block
// scale) is one zmm register.
template <int M, int U>
__attribute__((target("avx512f"), always_inline)) inline void avx512_step(
    const uint8_t* prow,       // packed bytes of the weight row (element 0 = high nibble of byte 0)
    const float* xa,           // fp32 [M, ldx] arranged x rows, [16 even | 16 odd] per 32
    int64_t ldx,               // row stride of xa in floats
    int64_t cc,                // first row element of this step (multiple of 32)
    __m512 tab,                // the 16 code values times this block's scale
    __m512 (&acc)[M][2 * U],   // accumulators [x row][pair u: even, odd]
    int u) {                   // which accumulator pair
  const __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(prow + (cc >> 1))));
  const __m512i hi = _mm512_srli_epi32(lo, 4);
  const __m512 we = _mm512_permutexvar_ps(hi, tab);  // elements cc, cc+2, ..., cc+30
  const __m512 wo = _mm512_permutexvar_ps(lo, tab);  // elements cc+1, ..., cc+31
  for (int i = 0; i < M; ++i) {
    acc[i][2 * u] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xa + i * ldx + cc), acc[i][2 * u]);
    acc[i][2 * u + 1] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xa + i * ldx + cc + 16), acc[i][2 * u + 1]);
  }
}

// Partial dot products of weight rows [n0, n1) over row elements [k0, k1) with M x rows.
template <int M>
__attribute__((target("avx512f"))) void avx512_rows(
    const Lut4Weight& w,  // packed weight [N, K]
    int64_t n0,           // first weight row
    int64_t n1,           // end weight row
    int64_t k0,           // K tile start (multiple of 32)
    int64_t k1,           // K tile end (multiple of 32)
    const float* xa,      // fp32 [M, ldx] arranged x rows of this group
    int64_t ldx,          // row stride of xa in floats (= K)
    float* pv,            // fp32 vector partials: row n, x row i at pv + (n-n0)*ldp + 16*i
    int64_t ldp,          // floats per weight row in pv
    bool first) {         // first K tile: overwrite pv instead of adding to it
  // U = 2 keeps two accumulator pairs per x row: with M <= 2 one chain per pair would be
  // FMA-latency bound (4 cycles per 32 weights) rather than decode bound.
  constexpr int U = (M <= 2) ? 2 : 1;
  const int64_t bs = w.blocksize;
  const __m512 code = _mm512_loadu_ps(w.code);
  float sc[kMaxTileBlocks];
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t flat0 = n * w.cols;
    const uint8_t* prow = w.packed + (flat0 >> 1);
    const int64_t b = tile_scales(w, flat0, k0, k1, sc);
    __m512 acc[M][2 * U];
    for (int i = 0; i < M; ++i)
      for (int v = 0; v < 2 * U; ++v) acc[i][v] = _mm512_setzero_ps();
    int64_t seg_end = (b + 1) * bs - flat0;  // end of the current block, relative to the row
    const float* scp = sc;
    for (int64_t s = k0; s < k1; seg_end += bs) {
      const int64_t e = std::min(seg_end, k1);
      const __m512 tab = _mm512_mul_ps(code, _mm512_set1_ps(*scp++));
      int64_t c = s;
      if (U == 2) {
        for (; c + 64 <= e; c += 64) {
          avx512_step<M, U>(prow, xa, ldx, c, tab, acc, 0);
          avx512_step<M, U>(prow, xa, ldx, c + 32, tab, acc, U - 1);
        }
      }
      for (; c < e; c += 32) avx512_step<M, U>(prow, xa, ldx, c, tab, acc, 0);
      s = e;
    }
    float* p = pv + (n - n0) * ldp;
    for (int i = 0; i < M; ++i) {
      __m512 t = _mm512_add_ps(acc[i][0], acc[i][1]);
      if (U == 2) t = _mm512_add_ps(t, _mm512_add_ps(acc[i][2], acc[i][3]));
      if (!first) t = _mm512_add_ps(t, _mm512_loadu_ps(p + 16 * i));
      _mm512_storeu_ps(p + 16 * i, t);
    }
  }
}

// AVX2: 8 bytes = 16 weights per step. A 16-entry lookup needs two vpermps (each indexes
// 8 entries with bits 2:0) and a blend on bit 3 of the index, shifted to the sign bit,
// which is what blendvps tests.
__attribute__((target("avx2,fma"), always_inline)) inline __m256 lut16_avx2(__m256i idx, __m256 t0, __m256 t1) {
  const __m256 p0 = _mm256_permutevar8x32_ps(t0, idx);
  const __m256 p1 = _mm256_permutevar8x32_ps(t1, idx);
  return _mm256_blendv_ps(p0, p1, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

template <int M, int U>
__attribute__((target("avx2,fma"), always_inline)) inline void avx2_step(
    const uint8_t* prow,       // packed bytes of the weight row
    const float* xa,           // fp32 [M, ldx] arranged x rows, [8 even | 8 odd] per 16
    int64_t ldx,               // row stride of xa in floats
    int64_t cc,                // first row element of this step (multiple of 16)
    __m256 t0,                 // code[0..7] times the block scale
    __m256 t1,                 // code[8..15] times the block scale
    __m256 (&acc)[M][2 * U],   // accumulators [x row][pair u: even, odd]
    int u) {                   // which accumulator pair
  const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(prow + (cc >> 1))));
  const __m256i hi = _mm256_srli_epi32(lo, 4);
  const __m256 we = lut16_avx2(hi, t0, t1);
  const __m256 wo = lut16_avx2(lo, t0, t1);
  for (int i = 0; i < M; ++i) {
    acc[i][2 * u] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xa + i * ldx + cc), acc[i][2 * u]);
    acc[i][2 * u + 1] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xa + i * ldx + cc + 8), acc[i][2 * u + 1]);
  }
}

template <int M>
__attribute__((target("avx2,fma"))) void avx2_rows(
    const Lut4Weight& w,  // packed weight [N, K]
    int64_t n0,           // first weight row
    int64_t n1,           // end weight row
    int64_t k0,           // K tile start (multiple of 32)
    int64_t k1,           // K tile end (multiple of 32)
    const float* xa,      // fp32 [M, ldx] arranged x rows of this group
    int64_t ldx,          // row stride of xa in floats (= K)
    float* pv,            // fp32 vector partials: row n, x row i at pv + (n-n0)*ldp + 8*i
    int64_t ldp,          // floats per weight row in pv
    bool first) {         // first K tile: overwrite pv instead of adding to it
  constexpr int U = (M <= 2) ? 2 : 1;
  const int64_t bs = w.blocksize;
  const __m256 c0 = _mm256_loadu_ps(w.code), c1 = _mm256_loadu_ps(w.code + 8);
  float sc[kMaxTileBlocks];
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t flat0 = n * w.cols;
    const uint8_t* prow = w.packed + (flat0 >> 1);
    const int64_t b = tile_scales(w, flat0, k0, k1, sc);
    __m256 acc[M][2 * U];
    for (int i = 0; i < M; ++i)
      for (int v = 0; v < 2 * U; ++v) acc[i][v] = _mm256_setzero_ps();
    int64_t seg_end = (b + 1) * bs - flat0;
    const float* scp = sc;
    for (int64_t s = k0; s < k1; seg_end += bs) {
      const int64_t e = std::min(seg_end, k1);
      const __m256 scale = _mm256_set1_ps(*scp++);
      const __m256 t0 = _mm256_mul_ps(c0, scale), t1 = _mm256_mul_ps(c1, scale);
      int64_t c = s;
      if (U == 2) {
        for (; c + 32 <= e; c += 32) {
          avx2_step<M, U>(prow, xa, ldx, c, t0, t1, acc, 0);
          avx2_step<M, U>(prow, xa, ldx, c + 16, t0, t1, acc, U - 1);
        }
      }
      for (; c < e; c += 16) avx2_step<M, U>(prow, xa, ldx, c, t0, t1, acc, 0);
      s = e;
    }
    float* p = pv + (n - n0) * ldp;
    for (int i = 0; i < M; ++i) {
      __m256 t = _mm256_add_ps(acc[i][0], acc[i][1]);
      if (U == 2) t = _mm256_add_ps(t, _mm256_add_ps(acc[i][2], acc[i][3]));
      if (!first) t = _mm256_add_ps(t, _mm256_loadu_ps(p + 8 * i));
      _mm256_storeu_ps(p + 8 * i, t);
    }
  }
}

using RowsFn = void (*)(const Lut4Weight&, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, float*,
                        int64_t, bool);

// Rows of x are processed in groups of up to 8 (AVX-512: 16 accumulators of 32 zmm) or 4
// (AVX2: 8 accumulators of 16 ymm); each group streams the weight tile once.
RowsFn avx512_fn(int64_t mg) {
  switch (mg) {
    case 1: return avx512_rows<1>;
    case 2: return avx512_rows<2>;
    case 3: return avx512_rows<3>;
    case 4: return avx512_rows<4>;
    case 5: return avx512_rows<5>;
    case 6: return avx512_rows<6>;
    case 7: return avx512_rows<7>;
    default: return avx512_rows<8>;
  }
}
RowsFn avx2_fn(int64_t mg) {
  switch (mg) {
    case 1: return avx2_rows<1>;
    case 2: return avx2_rows<2>;
    case 3: return avx2_rows<3>;
    default: return avx2_rows<4>;
  }
}

// Weight rows [n0, n1) of one fused-path product: y[i * ldy + col0 + n] for x rows i < m.
// The per-row arithmetic depends only on (w, x, m), never on which rows a call covers, so
// any split of the rows (threads, or several weights sharing one parallel region in
// lut4_gemm_small_multi) gives bit-identical outputs.
void gemm_fast_rows(const Lut4Weight& w,  // packed weight [N, K], K % 32 == 0, blocksize % 32 == 0
                    const float* xa,      // fp32 [m, K] arranged x (prepare_x with this ISA's G)
                    int64_t m,            // rows of x
                    const void* bias,     // [N] of type bt, or nullptr
                    DType bt,             // bias dtype
                    void* y,              // output of type yt, row stride ldy
                    DType yt,             // output dtype
                    Isa use,              // Avx512 or Avx2
                    int64_t ldy,          // elements per output row
                    int64_t col0,         // column of y that weight row 0 writes
                    int64_t n0,           // first weight row
                    int64_t n1) {         // end weight row
  const int64_t k = w.cols;
  const int64_t max_group = (use == Isa::Avx512) ? 8 : 4;
  const int64_t lanes = (use == Isa::Avx512) ? 16 : 8;
  const int64_t group = std::min<int64_t>(m, max_group);
  const int64_t kt_max = group == 1 ? kMaxTileK
                                    : std::max<int64_t>(32, (32 * 1024 / (4 * group)) / 32 * 32);
  const int64_t n_kt = (k + kt_max - 1) / kt_max;
  const int64_t kt = ((k + n_kt - 1) / n_kt + 31) / 32 * 32;
  const int64_t tile = std::max<int64_t>(8, 16384 / (m * lanes));
  std::vector<float> pv(static_cast<size_t>(std::min(tile, n1 - n0) * m * lanes));
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = std::min(n1, t0 + tile);
    for (int64_t k0 = 0; k0 < k; k0 += kt) {
      const int64_t k1 = std::min(k, k0 + kt);
      for (int64_t i0 = 0; i0 < m; i0 += max_group) {
        const int64_t mg = std::min<int64_t>(max_group, m - i0);
        RowsFn fn = (use == Isa::Avx512) ? avx512_fn(mg) : avx2_fn(mg);
        fn(w, t0, t1, k0, k1, xa + i0 * k, k, pv.data() + i0 * lanes, m * lanes, k0 == 0);
      }
    }
    for (int64_t n = t0; n < t1; ++n) {
      const float bv = bias ? load_as_float(bias, bt, n) : 0.f;
      for (int64_t i = 0; i < m; ++i) {
        const float* p = pv.data() + ((n - t0) * m + i) * lanes;
        float s = 0.f;
        for (int64_t l = 0; l < lanes; ++l) s += p[l];
        store_from_float(y, yt, i * ldy + col0 + n, s + bv);
      }
    }
  }
}

void gemm_fast(const Lut4Weight& w,  // packed weight [N, K], K % 32 == 0, blocksize % 32 == 0
               const float* xa,      // fp32 [m, K] arranged x (prepare_x with this ISA's G)
               int64_t m,            // rows of x
               const void* bias,     // [N] of type bt, or nullptr
               DType bt,             // bias dtype
               void* y,              // [m, N] output of type yt
               DType yt,             // output dtype
               Isa use) {            // Avx512 or Avx2
  at::parallel_for(0, w.rows, row_grain(w.cols, m), [&](int64_t n0, int64_t n1) {
    gemm_fast_rows(w, xa, m, bias, bt, y, yt, use, w.rows, 0, n0, n1);
  });
}
#endif

#if QK_X86
__attribute__((target("avx512f"))) void dequant_blocks_avx512(
    const Lut4Weight& w,  // packed weight, blocksize % 32 == 0
    int64_t b0,           // first block
    int64_t b1,           // end block
    int64_t lo,           // first flat element to write
    int64_t hi,           // end flat element
    int64_t base,         // flat element stored at out[0]
    float* out) {         // fp32 [hi - base] (at least)
  const __m512 code = _mm512_loadu_ps(w.code);
  // vpermt2ps indices interleaving (even, odd) lanes back into element order
  const __m512i ilo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i ihi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t f0 = std::max(lo, b * w.blocksize), f1 = std::min(hi, (b + 1) * w.blocksize);
    const __m512 tab = _mm512_mul_ps(code, _mm512_set1_ps(block_scale(w, b)));
    const int64_t fa = std::min(f1, (f0 + 31) / 32 * 32);
    dequant_range_scalar(w, f0, fa, out + (f0 - base));
    int64_t f = fa;
    for (; f + 32 <= f1; f += 32) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.packed + f / 2)));
      const __m512 we = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab);
      const __m512 wo = _mm512_permutexvar_ps(v, tab);
      _mm512_storeu_ps(out + (f - base), _mm512_permutex2var_ps(we, ilo, wo));
      _mm512_storeu_ps(out + (f - base) + 16, _mm512_permutex2var_ps(we, ihi, wo));
    }
    dequant_range_scalar(w, f, f1, out + (f - base));
  }
}

__attribute__((target("avx2,fma"))) void dequant_blocks_avx2(
    const Lut4Weight& w,  // packed weight, blocksize % 32 == 0
    int64_t b0,           // first block
    int64_t b1,           // end block
    int64_t lo,           // first flat element to write
    int64_t hi,           // end flat element
    int64_t base,         // flat element stored at out[0]
    float* out) {         // fp32 [hi - base] (at least)
  const __m256 c0 = _mm256_loadu_ps(w.code), c1 = _mm256_loadu_ps(w.code + 8);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t f0 = std::max(lo, b * w.blocksize), f1 = std::min(hi, (b + 1) * w.blocksize);
    const __m256 sc = _mm256_set1_ps(block_scale(w, b));
    const __m256 t0 = _mm256_mul_ps(c0, sc), t1 = _mm256_mul_ps(c1, sc);
    const int64_t fa = std::min(f1, (f0 + 15) / 16 * 16);
    dequant_range_scalar(w, f0, fa, out + (f0 - base));
    int64_t f = fa;
    for (; f + 16 <= f1; f += 16) {
      const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.packed + f / 2)));
      const __m256 we = lut16_avx2(_mm256_srli_epi32(v, 4), t0, t1);  // elements f, f+2, ..
      const __m256 wo = lut16_avx2(v, t0, t1);                        // elements f+1, f+3, ..
      // unpack interleaves within 128-bit lanes; permute2f128 puts the halves in order
      const __m256 a = _mm256_unpacklo_ps(we, wo), c = _mm256_unpackhi_ps(we, wo);
      _mm256_storeu_ps(out + (f - base), _mm256_permute2f128_ps(a, c, 0x20));
      _mm256_storeu_ps(out + (f - base) + 8, _mm256_permute2f128_ps(a, c, 0x31));
    }
    dequant_range_scalar(w, f, f1, out + (f - base));
  }
}

// fp32 -> bf16 / fp16, 16 values per step, rounding exactly like Tensor.to() (c10::BFloat16 /
// c10::Half): bf16 is round-to-nearest-even on the bit pattern (u + 0x7FFF + lsb) >> 16 with
// NaN -> 0x7FC0, denormals kept; fp16 is IEEE round-to-nearest-even (vcvtps2ph). Done with
// AVX-512F integer ops rather than AVX512-BF16's vcvtneps2bf16, which treats denormal inputs
// as zero and keeps NaN payloads: this way every ISA (and the scalar tail) gives the same
// bits as w.to(torch.bfloat16), which the tests check with torch.equal. Returns the 16
// bit patterns.
__attribute__((target("avx512f"), always_inline)) inline __m256i round16_avx512(__m512 v, DType t) {
  if (t == DType::F16) return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

__attribute__((target("avx512f"))) void cvt_f32_avx512(const float* src, int64_t count, DType t, void* dst) {
  int64_t i = 0;
  uint16_t* d = static_cast<uint16_t*>(dst);
  for (; i + 16 <= count; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), round16_avx512(_mm512_loadu_ps(src + i), t));
  for (; i < count; ++i) store_from_float(dst, t, i, src[i]);
}

// Dequantize straight to bf16 / fp16 (AVX-512BW): per block the 16-entry table
// code * scale is computed in fp32 and rounded once to the output type (round16_avx512,
// i.e. exactly what rounding each decoded fp32 weight gives), then 32 weights per step are
// one vpermw lookup: byte i becomes the dword (hi nibble | lo nibble << 16), whose two
// 16-bit halves are elements 2i and 2i+1 in memory order, so no interleave is needed.
// Same contract as dequant_blocks_avx512, out typed as 16-bit.
__attribute__((target("avx512f,avx512bw"))) void dequant_blocks_avx512_16(
    const Lut4Weight& w,  // packed weight, blocksize % 32 == 0
    int64_t b0,           // first block
    int64_t b1,           // end block
    int64_t lo,           // first flat element to write
    int64_t hi,           // end flat element
    int64_t base,         // flat element stored at out[0]
    DType t,              // BF16 or F16
    uint16_t* out) {      // [hi - base] (at least)
  const __m512 code = _mm512_loadu_ps(w.code);
  const __m512i m4 = _mm512_set1_epi32(0xF);
  alignas(32) uint16_t tab16[16];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t f0 = std::max(lo, b * w.blocksize), f1 = std::min(hi, (b + 1) * w.blocksize);
    // The table stays in registers (a store + wider reload would stall store forwarding
    // once per block); vpermw only reads its low 16 words.
    const __m256i t16 = round16_avx512(_mm512_mul_ps(code, _mm512_set1_ps(block_scale(w, b))), t);
    const __m512i tab = _mm512_castsi256_si512(t16);
    const int64_t fa = std::min(f1, (f0 + 31) / 32 * 32);
    const bool edges = fa > f0 || (f1 - fa) % 32 != 0;
    if (edges) _mm256_store_si256(reinterpret_cast<__m256i*>(tab16), t16);
    for (int64_t f = f0; f < fa; ++f) {
      const uint8_t byte = w.packed[f >> 1];
      out[f - base] = tab16[(f & 1) ? (byte & 0xF) : (byte >> 4)];
    }
    int64_t f = fa;
    for (; f + 32 <= f1; f += 32) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.packed + f / 2)));
      const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(v, 4), _mm512_slli_epi32(_mm512_and_si512(v, m4), 16));
      _mm512_storeu_si512(out + (f - base), _mm512_permutexvar_epi16(idx, tab));
    }
    for (; f < f1; ++f) {
      const uint8_t byte = w.packed[f >> 1];
      out[f - base] = tab16[(f & 1) ? (byte & 0xF) : (byte >> 4)];
    }
  }
}

__attribute__((target("avx2,fma,f16c"))) void cvt_f32_avx2(const float* src, int64_t count, DType t, void* dst) {
  int64_t i = 0;
  uint16_t* d = static_cast<uint16_t*>(dst);
  if (t == DType::BF16) {
    const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1), qnan = _mm256_set1_epi32(0x7FC0);
    for (; i + 8 <= count; i += 8) {
      const __m256 v = _mm256_loadu_ps(src + i);
      const __m256i u = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, lsb)), 16);
      r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      // r holds 8 values < 65536 in 32-bit lanes: pack to 16 bits (unsigned saturation is exact)
      const __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), p);
    }
  } else {
    for (; i + 8 <= count; i += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), h);
    }
  }
  for (; i < count; ++i) store_from_float(dst, t, i, src[i]);
}
#endif  // QK_X86

}  // namespace

const char* lut4_cpu_isa() { return isa_name(isa()); }

void lut4_dequantize_rows(const Lut4Weight& w_in, int64_t r0, int64_t r1, float* out) {
  const Lut4Weight w = with_derived(w_in);
  const int64_t lo = r0 * w.cols, hi = r1 * w.cols;
  if (hi <= lo) return;
  const int64_t bs = w.blocksize;
  const int64_t b_first = lo / bs, b_end = (hi + bs - 1) / bs;
  const Isa use = isa();
  const int64_t grain = std::max<int64_t>(1, 65536 / bs);
  at::parallel_for(b_first, b_end, grain, [&](int64_t b0, int64_t b1) {
#if QK_X86
    if (bs % 32 == 0 && use == Isa::Avx512) return dequant_blocks_avx512(w, b0, b1, lo, hi, lo, out);
    if (bs % 32 == 0 && use == Isa::Avx2) return dequant_blocks_avx2(w, b0, b1, lo, hi, lo, out);
#else
    (void)use;
#endif
    const int64_t f0 = std::max(lo, b0 * bs), f1 = std::min(hi, b1 * bs);
    dequant_range_scalar(w, f0, f1, out + (f0 - lo));
  });
}

void lut4_dequantize(const Lut4Weight& w, float* out) { lut4_dequantize_rows(w, 0, w.rows, out); }

void lut4_dequantize_rows_to(const Lut4Weight& w_in, int64_t r0, int64_t r1, DType out_t, void* out) {
  if (out_t == DType::F32) return lut4_dequantize_rows(w_in, r0, r1, static_cast<float*>(out));
  const Lut4Weight w = with_derived(w_in);
  const int64_t lo = r0 * w.cols, hi = r1 * w.cols;
  if (hi <= lo) return;
  const int64_t bs = w.blocksize;
  const int64_t b_first = lo / bs, b_end = (hi + bs - 1) / bs;
  const Isa use = isa();
  // AVX-512BW: one 16-bit table lookup per weight straight into out (~1 ms instead of ~1.6 ms
  // for 4096x4096 on 2 cores with decode + convert). Otherwise each thread decodes <= ~4K elements
  // (whole blocks) into an fp32 scratch that stays in L1, with the same bit-exact decoders
  // as lut4_dequantize, then rounds them into out.
  const bool direct = bs % 32 == 0 && has_avx512bw();
  const int64_t chunk_blocks = std::max<int64_t>(1, 4096 / bs);
  const int64_t grain = std::max<int64_t>(chunk_blocks, 65536 / bs);
  at::parallel_for(b_first, b_end, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> tmp(direct ? 0 : static_cast<size_t>(std::min(hi - lo, chunk_blocks * bs)));
    for (int64_t c0 = b0; c0 < b1; c0 += chunk_blocks) {
      const int64_t c1 = std::min(b1, c0 + chunk_blocks);
      const int64_t f0 = std::max(lo, c0 * bs), f1 = std::min(hi, c1 * bs);
#if QK_X86
      if (direct) {
        dequant_blocks_avx512_16(w, c0, c1, lo, hi, lo, out_t, static_cast<uint16_t*>(out));
        continue;
      }
      if (bs % 32 == 0 && use == Isa::Avx512) dequant_blocks_avx512(w, c0, c1, lo, hi, f0, tmp.data());
      else if (bs % 32 == 0 && use == Isa::Avx2) dequant_blocks_avx2(w, c0, c1, lo, hi, f0, tmp.data());
      else dequant_range_scalar(w, f0, f1, tmp.data());
      const int64_t off = f0 - lo;
      void* dst = static_cast<uint16_t*>(out) + off;
      if (use == Isa::Avx512) cvt_f32_avx512(tmp.data(), f1 - f0, out_t, dst);
      else if (use == Isa::Avx2) cvt_f32_avx2(tmp.data(), f1 - f0, out_t, dst);
      else
        for (int64_t i = 0; i < f1 - f0; ++i) store_from_float(dst, out_t, i, tmp[i]);
#else
      (void)use;
      dequant_range_scalar(w, f0, f1, tmp.data());
      void* dst = static_cast<uint16_t*>(out) + (f0 - lo);
      for (int64_t i = 0; i < f1 - f0; ++i) store_from_float(dst, out_t, i, tmp[i]);
#endif
    }
  });
}

void lut4_gemm_small(const Lut4Weight& w_in, const void* x, DType xt, int64_t m, const void* bias, DType bt,
                     void* y) {
  const Lut4Weight w = with_derived(w_in);
  const int64_t k = w.cols;
  if (m == 0 || w.rows == 0) return;
  const Isa use = isa();
  // Fast path: every row starts on a byte and 32-element boundary and no 32-chunk straddles
  // a block (true for all LLM shapes); anything else takes the generic decode-row path.
  const bool fast = use != Isa::Scalar && k % 32 == 0 && w.blocksize % 32 == 0;
  const int g = fast ? (use == Isa::Avx512 ? 16 : 8) : 0;
  std::vector<float> xa(static_cast<size_t>(m * k));
  prepare_x(x, xt, m, k, g, xa.data());
#if QK_X86
  if (fast) return gemm_fast(w, xa.data(), m, bias, bt, y, xt, use);
#endif
  gemm_generic(w, xa.data(), m, bias, bt, y, xt, use);
}

bool lut4_gemm_small_multi(const Lut4Weight* ws_in, int64_t nw, const void* x, DType xt, int64_t m,
                           const void* const* biases, const DType* bts, void* y) {
  const Isa use = isa();
  if (use == Isa::Scalar || nw <= 0 || m == 0) return false;
  std::vector<Lut4Weight> ws(static_cast<size_t>(nw));
  std::vector<int64_t> col0(static_cast<size_t>(nw) + 1, 0);
  const int64_t k = ws_in[0].cols;
  for (int64_t j = 0; j < nw; ++j) {
    ws[j] = with_derived(ws_in[j]);
    if (ws[j].cols != k || k % 32 != 0 || ws[j].blocksize % 32 != 0) return false;
    col0[j + 1] = col0[j] + ws[j].rows;
  }
#if QK_X86
  const int64_t total = col0[nw];
  std::vector<float> xa(static_cast<size_t>(m * k));
  prepare_x(x, xt, m, k, use == Isa::Avx512 ? 16 : 8, xa.data());
  // one parallel region over the rows of all weights: each thread's range is cut at the
  // weights' boundaries
  at::parallel_for(0, total, row_grain(k, m), [&](int64_t a, int64_t e) {
    for (int64_t j = 0; j < nw; ++j) {
      const int64_t lo = std::max(a, col0[j]), hi = std::min(e, col0[j + 1]);
      if (lo < hi)
        gemm_fast_rows(ws[j], xa.data(), m, biases[j], bts[j], y, xt, use, total, col0[j], lo - col0[j],
                       hi - col0[j]);
    }
  });
  return true;
#else
  (void)x, (void)xt, (void)biases, (void)bts, (void)y;
  return false;
#endif
}

}  // namespace cpu
}  // namespace quantkit
