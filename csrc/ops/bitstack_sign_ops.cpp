// CPU ops for BitStack's compress-time sign choice (quantkit/formats/bitstack.py):
//   bitstack_feedback_signs(r, mag, hinv_u, cols)          GPTQ-style error feedback
//   bitstack_refine_signs(r, mag, signs, h, sweeps, cols)  coordinate-descent sweeps
// Same algorithm as the pure-torch references (_feedback_signs / _refine_signs): columns in
// groups of `cols`; inside a group the sequential per-column loop (csrc/cpu/bitstack_signs.cpp,
// rows in parallel), between groups one MKL product that passes the group's effect to the
// later columns.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/bitstack_signs.h"

namespace quantkit {
namespace ops {
namespace {

void check_matrix(const at::Tensor& t, int64_t rows, int64_t cols, const char* op, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ",
              what, " must be float32 [", rows, ", ", cols, "], got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": CPU kernel got ", what, " on ", t.device());
}

void check_common(const at::Tensor& r, const at::Tensor& mag, const at::Tensor& sq, int64_t cols, const char* op,
                  const char* sq_name) {
  TORCH_CHECK(r.dim() == 2, op, ": r must be 2-D [m, n], got ", r.sizes());
  const int64_t m = r.size(0), n = r.size(1);
  check_matrix(r, m, n, op, "r");
  check_matrix(mag, m, n, op, "mag");
  check_matrix(sq, n, n, op, sq_name);
  TORCH_CHECK(cols >= 1, op, ": cols must be >= 1, got ", cols);
}

at::Tensor bitstack_feedback_signs_cpu(const at::Tensor& r, const at::Tensor& mag, const at::Tensor& hinv_u,
                                       int64_t cols) {
  check_common(r, mag, hinv_u, cols, "bitstack_feedback_signs", "hinv_u");
  const int64_t m = r.size(0), n = r.size(1);
  at::Tensor w = r.contiguous().clone();
  const at::Tensor mg = mag.contiguous(), u = hinv_u.contiguous();
  at::Tensor signs = at::empty({m, n}, r.options());
  if (m == 0 || n == 0) return signs;
  for (int64_t c0 = 0; c0 < n; c0 += cols) {
    const int64_t c1 = std::min(c0 + cols, n);
    at::Tensor errs = at::empty({m, c1 - c0}, r.options());
    cpu::bitstack_feedback_group(w.data_ptr<float>(), mg.data_ptr<float>(), u.data_ptr<float>(), m, n, c0, c1,
                                 signs.data_ptr<float>(), errs.data_ptr<float>());
    if (c1 < n) {
      at::Tensor later = w.narrow(1, c1, n - c1);
      later.sub_(at::mm(errs, u.narrow(0, c0, c1 - c0).narrow(1, c1, n - c1)));
    }
  }
  return signs;
}

at::Tensor bitstack_refine_signs_cpu(const at::Tensor& r, const at::Tensor& mag, const at::Tensor& signs,
                                     const at::Tensor& h, int64_t sweeps, int64_t cols) {
  check_common(r, mag, h, cols, "bitstack_refine_signs", "h");
  const int64_t m = r.size(0), n = r.size(1);
  check_matrix(signs, m, n, "bitstack_refine_signs", "signs");
  TORCH_CHECK(sweeps >= 0, "bitstack_refine_signs: sweeps must be >= 0, got ", sweeps);
  const at::Tensor mg = mag.contiguous(), hc = h.contiguous();
  at::Tensor s = signs.contiguous().clone();
  if (m == 0 || n == 0) return s;
  for (int64_t sweep = 0; sweep < sweeps; ++sweep) {
    at::Tensor g = at::mm(r - s * mg, hc).contiguous();  // g = e H, e = r - S (.) mag
    for (int64_t c0 = 0; c0 < n; c0 += cols) {
      const int64_t c1 = std::min(c0 + cols, n);
      at::Tensor moved = at::empty({m, c1 - c0}, r.options());
      cpu::bitstack_refine_group(g.data_ptr<float>(), mg.data_ptr<float>(), hc.data_ptr<float>(), m, n, c0, c1,
                                 s.data_ptr<float>(), moved.data_ptr<float>());
      if (c1 < n) {
        at::Tensor later = g.narrow(1, c1, n - c1);
        later.add_(at::mm(moved, hc.narrow(0, c0, c1 - c0).narrow(1, c1, n - c1)));
      }
    }
  }
  return s;
}

}  // namespace
}  // namespace ops
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("bitstack_feedback_signs", &quantkit::ops::bitstack_feedback_signs_cpu);
  m.impl("bitstack_refine_signs", &quantkit::ops::bitstack_refine_signs_cpu);
}
