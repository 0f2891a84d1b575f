// BitStack compress-time sign choice, the sequential part: one group of columns, all rows.
// (csrc/ops/bitstack_sign_ops.cpp runs the groups and the products between them; the
// reference is _feedback_signs / _refine_signs in quantkit/formats/bitstack.py.)
//
// Every row is independent inside a group, so rows run in parallel; inside a row the
// columns are strictly sequential (each column's decision moves the later ones), which is
// why this loop is C++: in Python it is one interpreter round trip per column.
// All matrices are fp32, row-major, contiguous; m rows, n columns; group = columns [c0, c1).
#pragma once

#include <cstdint>

namespace quantkit {
namespace cpu {

// GPTQ-style error feedback for the block S (.) mag of the residual w:
//   for c in [c0, c1): s = (w[r, c] >= 0 ? +1 : -1); e = (w[r, c] - s * mag[r, c]) / U[c, c];
//                      w[r, c'] -= e * U[c, c'] for c < c' < c1
// signs[r, c] = s, errs[r, c - c0] = e. w's group columns are read, not written (a row copy
// is updated); U is the upper Cholesky factor of the damped inverse Gram, [n, n].
void bitstack_feedback_group(const float* w, const float* mag, const float* hinv_u, int64_t m, int64_t n,
                             int64_t c0, int64_t c1,
                             float* signs,   // [m, n]: columns [c0, c1) written
                             float* errs);   // [m, c1 - c0]

// One group of a coordinate-descent sweep on the signs (error e = w - S (.) mag, g = e H):
//   for c in [c0, c1): delta = 2 s[r, c] mag[r, c];
//     flip when 2 * delta * g[r, c] + delta * delta * H[c, c] < 0 (the error e H e^T drops);
//     then s[r, c] = -s[r, c], moved[r, c - c0] = delta (else 0), g[r, c'] += delta * H[c, c']
//     for c < c' < c1.
// g's group columns are read, not written (a row copy is updated). h is the damped Gram [n, n].
void bitstack_refine_group(const float* g, const float* mag, const float* h, int64_t m, int64_t n, int64_t c0,
                           int64_t c1,
                           float* signs,   // [m, n]: columns [c0, c1) read and updated
                           float* moved);  // [m, c1 - c0]

}  // namespace cpu
}  // namespace quantkit
