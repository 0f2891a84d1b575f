"""Native CPU sign-choice loops of the BitStack compress (quantkit._C:
bitstack_feedback_signs / bitstack_refine_signs) against their pure-torch references.

The C++ loop does the reference's arithmetic operation by operation; torch's vectorised
kernels may round a product differently, which can resolve a near-tie the other way, so
large shapes compare the output error and the sign agreement, small ones compare exactly.
Needs the compiled extension (CI builds it); without it the module skips.
"""

import pytest
import torch

import quantkit._ops as ops
from quantkit.formats import bitstack

pytestmark = pytest.mark.skipif(not ops.has_native_cpu_kernel("bitstack_feedback_signs"),
                                reason=f"quantkit._C CPU kernels not loaded: {ops.native_status()}")

# (m, n): one row / one column, n below / at / past a 32-column group, tails, SmolLM2 widths
SMALL = [(1, 1), (3, 7), (17, 33), (5, 70), (1, 64), (3, 65)]
LARGE = [(17, 577), (192, 576), (64, 1536)]


def _problem(m, n, seed):
    """Residual r, magnitudes mag (a rank-2 positive matrix, as u v of |r|), damped Gram h and
    the upper Cholesky factor of its inverse, from correlated inputs (as LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(m, n, generator=g)
    mag = (r.abs().mean(1, keepdim=True) * torch.rand(1, n, generator=g) * 2
           + 0.1 * torch.rand(m, 1, generator=g) @ torch.rand(1, n, generator=g))
    x = torch.randn(2 * n + 8, 3, generator=g) @ torch.randn(3, n, generator=g) + 0.3 * torch.randn(2 * n + 8, n, generator=g)
    h, hinv_u = bitstack._damped_gram_and_hinv(x.T @ x, 0.1)
    return r, mag, h, hinv_u


def _err(r, mag, s, h):
    e = r - s * mag
    return float(((e @ h) * e).sum())


@pytest.mark.parametrize("cols", [8, 32])
@pytest.mark.parametrize("m,n", SMALL)
def test_feedback_small_shapes_exact(m, n, cols):
    r, mag, _, hinv_u = _problem(m, n, m * 1000 + n)
    native = torch.ops.quantkit.bitstack_feedback_signs(r, mag, hinv_u, cols)
    assert torch.equal(native, ops.bitstack_feedback_signs_reference(r, mag, hinv_u, cols))
    assert set(native.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("sweeps", [1, 2])
@pytest.mark.parametrize("m,n", SMALL)
def test_refine_small_shapes_exact(m, n, sweeps):
    r, mag, h, hinv_u = _problem(m, n, m * 1000 + n + 1)
    greedy = ops.bitstack_feedback_signs_reference(r, mag, hinv_u)
    native = torch.ops.quantkit.bitstack_refine_signs(r, mag, greedy, h, sweeps, 8)
    assert torch.equal(native, ops.bitstack_refine_signs_reference(r, mag, greedy, h, sweeps, 8))


@pytest.mark.parametrize("m,n", LARGE)
def test_feedback_and_refine_large_shapes_agree(m, n):
    r, mag, h, hinv_u = _problem(m, n, m + n)
    ref = ops.bitstack_feedback_signs_reference(r, mag, hinv_u)
    nat = torch.ops.quantkit.bitstack_feedback_signs(r, mag, hinv_u)
    assert float((ref == nat).float().mean()) > 0.999
    assert _err(r, mag, nat, h) == pytest.approx(_err(r, mag, ref, h), rel=1e-3)
    ref2 = ops.bitstack_refine_signs_reference(r, mag, ref, h, 1)
    nat2 = torch.ops.quantkit.bitstack_refine_signs(r, mag, ref, h, 1)
    assert float((ref2 == nat2).float().mean()) > 0.999
    assert _err(r, mag, nat2, h) == pytest.approx(_err(r, mag, ref2, h), rel=1e-3)
    assert _err(r, mag, nat2, h) <= _err(r, mag, ref, h) * (1 + 1e-6)  # a sweep never raises the error


def test_quantize_uses_the_native_loop_and_matches_the_reference(monkeypatch):
    """quantize with a Hessian goes through the ops; with the references patched in instead of
    the native kernels the blocks have the same output error."""
    r, _, h, _ = _problem(48, 200, 7)
    native = bitstack.quantize(r, 3, 4, "exact", hessian=h, damp=0.1, factor_dtype="int8", sign_sweeps=1)
    calls = []

    def fb(*a):
        calls.append("feedback")
        return ops.bitstack_feedback_signs_reference(*a)

    def rf(*a):
        calls.append("refine")
        return ops.bitstack_refine_signs_reference(*a)

    monkeypatch.setattr(torch.ops.quantkit, "bitstack_feedback_signs", fb)
    monkeypatch.setattr(torch.ops.quantkit, "bitstack_refine_signs", rf)
    ref = bitstack.quantize(r, 3, 4, "exact", hessian=h, damp=0.1, factor_dtype="int8", sign_sweeps=1)
    assert calls == ["feedback", "refine"] * 3
    for b in (1, 2, 3):
        e_n = r - bitstack.reconstruct(native, b)
        e_r = r - bitstack.reconstruct(ref, b)
        assert float(((e_n @ h) * e_n).sum()) == pytest.approx(float(((e_r @ h) * e_r).sum()), rel=1e-3)


def test_opcheck():
    r, mag, h, hinv_u = _problem(5, 40, 3)
    s = ops.bitstack_feedback_signs_reference(r, mag, hinv_u)
    torch.library.opcheck(torch.ops.quantkit.bitstack_feedback_signs.default, (r, mag, hinv_u, 8),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.quantkit.bitstack_refine_signs.default, (r, mag, s, h, 1, 8),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_bad_input_named(impl):
    fb = (torch.ops.quantkit.bitstack_feedback_signs if impl == "native" else ops.bitstack_feedback_signs_reference)
    rf = (torch.ops.quantkit.bitstack_refine_signs if impl == "native" else ops.bitstack_refine_signs_reference)
    r, mag, h, hinv_u = _problem(4, 9, 1)
    with pytest.raises(RuntimeError, match="hinv_u must be float32 \\[9, 9\\]"):
        fb(r, mag, hinv_u[:8, :8], 8)
    with pytest.raises(RuntimeError, match="mag must be float32"):
        fb(r, mag.double(), hinv_u, 8)
    with pytest.raises(RuntimeError, match="cols must be >= 1"):
        fb(r, mag, hinv_u, 0)
    with pytest.raises(RuntimeError, match="signs must be float32 \\[4, 9\\]"):
        rf(r, mag, torch.ones(4, 8), h, 1, 8)
    with pytest.raises(RuntimeError, match="sweeps must be >= 0"):
        rf(r, mag, torch.ones(4, 9), h, -1, 8)
