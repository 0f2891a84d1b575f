// int-k CPU kernels (see intk_linear.h for the layout).
//
// Decoding: for bit widths dividing 8 (1, 2, 4, 8) a code never crosses a byte, so each byte
// yields 8/bits codes with fixed shifts; for 3, 5, 6 and 7 bits a code may straddle two
// bytes and is read from a 16-bit window. The value is (float(code) - offset) * scale in two
// fp32 operations (offset is a half-integer, so the subtraction is exact; the product is
// rounded once), which is the reference's expression; the build uses -ffp-contract=off so
// no FMA changes the rounding.
#include "cpu/intk_linear.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace quantkit {
namespace cpu {
namespace {

// Bit widths dividing 8, with the width a compile-time constant so the per-byte loop unrolls
// and the byte loop vectorises (a runtime width kept it scalar: ~10x slower).
template <int B>
void decode_row_pow2(const uint8_t* row, int64_t k, float off, float s, float* out) {
  constexpr int per = 8 / B;
  constexpr unsigned mask = (1u << B) - 1u;
  const int64_t full = k / per;
  for (int64_t i = 0; i < full; ++i) {
    const unsigned byte = row[i];
    for (int j = 0; j < per; ++j) out[i * per + j] = (static_cast<float>((byte >> (j * B)) & mask) - off) * s;
  }
  for (int64_t c = full * per; c < k; ++c) {
    const unsigned byte = row[c / per];
    out[c] = (static_cast<float>((byte >> ((c % per) * B)) & mask) - off) * s;
  }
}

// Decode one packed row into fp32 values.
void decode_row(const IntKWeight& w, int64_t r, float* out) {
  const uint8_t* row = w.packed + r * w.row_bytes;
  const float s = w.scale[r];
  const float off = w.offset;
  const int64_t k = w.cols;
  switch (w.bits) {
    case 8: return decode_row_pow2<8>(row, k, off, s, out);
    case 4: return decode_row_pow2<4>(row, k, off, s, out);
    case 2: return decode_row_pow2<2>(row, k, off, s, out);
    case 1: return decode_row_pow2<1>(row, k, off, s, out);
    default: {
      const int b = w.bits;
      const unsigned mask = (1u << b) - 1u;
      for (int64_t c = 0; c < k; ++c) {
        const int64_t p = c * b;
        const int64_t byte = p >> 3;
        unsigned v = row[byte];
        if (byte + 1 < w.row_bytes) v |= static_cast<unsigned>(row[byte + 1]) << 8;
        out[c] = (static_cast<float>((v >> (p & 7)) & mask) - off) * s;
      }
      return;
    }
  }
}

}  // namespace

void intk_dequantize_rows(const IntKWeight& w, int64_t r0, int64_t r1, float* out) {
  at::parallel_for(r0, r1, 16, [&](int64_t a, int64_t e) {
    for (int64_t r = a; r < e; ++r) decode_row(w, r, out + (r - r0) * w.cols);
  });
}

void intk_gemm_small(const IntKWeight& w, const float* x, int64_t m, const float* bias, float* y) {
  const int64_t n = w.rows, k = w.cols;
  at::parallel_for(0, n, 8, [&](int64_t a, int64_t e) {
    std::vector<float> buf(static_cast<size_t>(k));
    for (int64_t r = a; r < e; ++r) {
      decode_row(w, r, buf.data());
      const float b = bias ? bias[r] : 0.0f;
      for (int64_t i = 0; i < m; ++i) {
        const float* xi = x + i * k;
        // 8 partial sums: lets the compiler vectorise without -ffast-math reassociation
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t c = 0;
        for (; c + 8 <= k; c += 8)
          for (int j = 0; j < 8; ++j) acc[j] += xi[c + j] * buf[c + j];
        float tail = 0.0f;
        for (; c < k; ++c) tail += xi[c] * buf[c];
        const float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
        y[i * n + r] = sum + b;
      }
    }
  });
}

}  // namespace cpu
}  // namespace quantkit
