// BitStack compress-time sign choice, one column group (see bitstack_signs.h). The
// arithmetic follows quantkit/formats/bitstack.py's _feedback_signs / _refine_signs
// operation by operation (no FMA contraction: setup.py builds with -ffp-contract=off), so
// the two differ only where torch's vectorised kernels round differently.
#include "cpu/bitstack_signs.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace quantkit {
namespace cpu {

namespace {
// Rows per parallel task: a row of one group is ~(c1 - c0)^2 / 2 multiply-adds (~512 at 32
// columns), so tasks of 64 rows keep the scheduling cost small.
constexpr int64_t kGrainRows = 64;
}  // namespace

void bitstack_feedback_group(const float* w, const float* mag, const float* hinv_u, int64_t m, int64_t n,
                             int64_t c0, int64_t c1, float* signs, float* errs) {
  const int64_t g = c1 - c0;
  at::parallel_for(0, m, kGrainRows, [&](int64_t r0, int64_t r1) {
    std::vector<float> wg(g);
    for (int64_t r = r0; r < r1; ++r) {
      std::copy(w + r * n + c0, w + r * n + c1, wg.begin());
      const float* mrow = mag + r * n + c0;
      float* srow = signs + r * n + c0;
      float* erow = errs + r * g;
      for (int64_t j = 0; j < g; ++j) {
        const float* urow = hinv_u + (c0 + j) * n + c0;
        const float s = wg[j] >= 0.f ? 1.f : -1.f;
        const float e = (wg[j] - s * mrow[j]) / urow[j];
        srow[j] = s;
        erow[j] = e;
        for (int64_t t = j + 1; t < g; ++t) wg[t] -= e * urow[t];  // later columns absorb the error
      }
    }
  });
}

void bitstack_refine_group(const float* g, const float* mag, const float* h, int64_t m, int64_t n, int64_t c0,
                           int64_t c1, float* signs, float* moved) {
  const int64_t width = c1 - c0;
  at::parallel_for(0, m, kGrainRows, [&](int64_t r0, int64_t r1) {
    std::vector<float> gg(width);
    for (int64_t r = r0; r < r1; ++r) {
      std::copy(g + r * n + c0, g + r * n + c1, gg.begin());
      const float* mrow = mag + r * n + c0;
      float* srow = signs + r * n + c0;
      float* drow = moved + r * width;
      for (int64_t j = 0; j < width; ++j) {
        const int64_t c = c0 + j;
        const float delta = 2.f * srow[j] * mrow[j];
        const bool flip = (2.f * delta * gg[j] + delta * delta * h[c * n + c]) < 0.f;
        if (!flip) {
          drow[j] = 0.f;
          continue;
        }
        srow[j] = -srow[j];
        drow[j] = delta;
        const float* hrow = h + c * n + c0;
        for (int64_t t = j + 1; t < width; ++t) gg[t] += delta * hrow[t];  // e[r, c] moved: g += delta * H[c]
      }
    }
  });
}

}  // namespace cpu
}  // namespace quantkit
