"""Native CPU BitStack kernels (quantkit._C) against the pure-torch reference on the same blocks.

Needs the compiled extension (CI builds it); without it the module skips. Blocks come from
random signs and fp16 factors (the kernel must be right for any packed input, not only
for decompositions), plus one real decomposition.
"""

import os
import subprocess
import sys

import pytest
import torch

import quantkit._ops as ops
from quantkit.formats import bitstack

pytestmark = pytest.mark.skipif(not ops.has_native_cpu_kernel("bitstack_linear"),
                                reason=f"quantkit._C CPU kernels not loaded: {ops.native_status()}")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (m out, n in, k): k = 16 hits the one-register path, others the generic loop; odd n leaves
# tail bits in the last byte (and a 4-column group with fewer than 4 columns).
SHAPES = [(32, 64, 16), (17, 33, 16), (5, 13, 3), (40, 7, 16), (1, 1, 1), (9, 100, 8), (64, 576, 16)]


def _blocks(b, m, n, k, seed=0, factors="float16"):
    """signs, u, v, scale: random packed blocks (scale None for fp16 factors; int8 factors use
    the whole code range −128..127 the dtype allows, not only what quantize writes)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 256, (b, m, (n + 7) // 8), dtype=torch.uint8, generator=g)
    if n % 8:  # the format keeps padding bits zero
        signs[..., -1] &= (0xFF << (8 - n % 8)) & 0xFF
    if factors == "int8":
        u = torch.randint(-128, 128, (b, m, k), dtype=torch.int8, generator=g)
        v = torch.randint(-128, 128, (b, k, n), dtype=torch.int8, generator=g)
        return signs, u, v, torch.rand(b, k, generator=g) * 1e-4
    u = (torch.randn(b, m, k, generator=g) * 0.3).half()
    v = (torch.randn(b, k, n, generator=g) * 0.3).half()
    return signs, u, v, None


FACTORS = pytest.mark.parametrize("factors", ["float16", "int8"])


def _check(y, r, x, w):
    """Elementwise bound: fp32 summation-order error ~ (#terms)·eps·Σ|x||w|-scale, with margin;
    half dtypes: one rounding of the output (2^-8 bf16) on top."""
    mag = x.float().abs() @ w.abs().T + 1e-6
    tol = 1e-5 if x.dtype == torch.float32 else 2.0 ** -7
    err = (y.float() - r.float()).abs()
    assert y.dtype == r.dtype and y.shape == r.shape
    assert (err <= mag * tol + r.float().abs() * tol).all(), float((err / mag).max())


def test_registered():
    from quantkit import _C
    assert ops.has_native_cpu_kernel("bitstack_dequantize")
    assert _C.bitstack_cpu_isa() in ("avx512", "avx2", "scalar")


@FACTORS
@pytest.mark.parametrize("m_x", [1, 3, 17])
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("b", [1, 2, 4])
def test_linear_matches_reference(m_x, m, n, k, b, factors):
    signs, u, v, scale = _blocks(b, m, n, k, seed=m * 100 + n + b, factors=factors)
    x = torch.randn(m_x, n)
    bias = torch.randn(m)
    y = torch.ops.quantkit.bitstack_linear(x, signs, u, v, bias, scale)
    r = ops.bitstack_linear_reference(x, signs, u, v, bias, scale)
    _check(y, r, x, ops.bitstack_dequantize_reference(signs, u, v, scale))


@FACTORS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m_x", [1, 3, 17])
def test_half_activations(dtype, m_x, factors):
    signs, u, v, scale = _blocks(3, 24, 37, 16, seed=5, factors=factors)
    x = torch.randn(2, m_x, 37).to(dtype)  # leading batch dims are flattened
    bias = torch.randn(24).to(dtype)
    y = torch.ops.quantkit.bitstack_linear(x, signs, u, v, bias, scale)
    r = ops.bitstack_linear_reference(x, signs, u, v, bias, scale)
    assert y.shape == (2, m_x, 24)
    _check(y.reshape(-1, 24), r.reshape(-1, 24), x.reshape(-1, 37),
           ops.bitstack_dequantize_reference(signs, u, v, scale))


@FACTORS
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_dequantize_matches_reference(m, n, k, factors):
    signs, u, v, scale = _blocks(3, m, n, k, seed=n, factors=factors)
    out = torch.ops.quantkit.bitstack_dequantize(signs, u, v, scale)
    ref = ops.bitstack_dequantize_reference(signs, u, v, scale)
    # u_i v_i by MKL vs torch.bmm: same fp32 products, summation order may differ
    torch.testing.assert_close(out, ref, atol=1e-5 * (ref.abs().max().item() + 1e-6), rtol=1e-5)


@FACTORS
def test_identity_reproduces_weight(factors):
    """x = I: the decode kernel (m_x = 1 row at a time) returns the dequantized weight's columns."""
    q = bitstack.quantize(torch.randn(20, 11), n_blocks=3, rank=4, factor_dtype=factors)
    w = bitstack.reconstruct(q)
    cols = torch.stack([torch.ops.quantkit.bitstack_linear(e[None], q.signs, q.u, q.v, None, q.scale)[0]
                        for e in torch.eye(11)], dim=1)
    torch.testing.assert_close(cols, w, atol=1e-5 * w.abs().max().item(), rtol=1e-5)


def test_bad_shapes_name_the_problem():
    signs, u, v, _ = _blocks(2, 8, 16, 4)
    with pytest.raises(RuntimeError, match="x has last dim 15"):
        torch.ops.quantkit.bitstack_linear(torch.randn(1, 15), signs, u, v, None)
    with pytest.raises(RuntimeError, match="m=8 x n=16"):
        torch.ops.quantkit.bitstack_linear(torch.randn(1, 16), signs[:, :, :1].contiguous(), u, v, None)
    with pytest.raises(RuntimeError, match="block counts"):
        torch.ops.quantkit.bitstack_linear(torch.randn(1, 16), signs[:1], u, v, None)


def test_int8_factor_errors_name_the_problem():
    signs, u, v, scale = _blocks(2, 8, 16, 4, factors="int8")
    x = torch.randn(1, 16)
    for op in ("native", "reference"):
        f = torch.ops.quantkit.bitstack_linear if op == "native" else ops.bitstack_linear_reference
        with pytest.raises(RuntimeError, match="int8 \\(with an fp32 scale\\)"):
            f(x, signs, u, v, None)  # int8 factors without their scale
        with pytest.raises(RuntimeError, match="int8 \\(with an fp32 scale\\)"):
            f(x, signs, u.half(), v.half(), None, scale)  # fp16 factors with a scale
        with pytest.raises(RuntimeError, match="scale must be"):
            f(x, signs, u, v, None, scale[:, :2].contiguous())


@FACTORS
def test_opcheck(factors):
    signs, u, v, scale = _blocks(2, 12, 21, 16, factors=factors)
    bias = torch.randn(12)
    torch.library.opcheck(torch.ops.quantkit.bitstack_linear.default, (torch.randn(2, 21), signs, u, v, bias, scale))
    x = torch.randn(3, 21, requires_grad=True)
    torch.library.opcheck(torch.ops.quantkit.bitstack_linear.default, (x, signs, u, v, bias, scale))
    torch.library.opcheck(torch.ops.quantkit.bitstack_dequantize.default, (signs, u, v, scale))


@FACTORS
def test_grad_x_matches_dense(factors):
    signs, u, v, scale = _blocks(2, 12, 21, 16, factors=factors)
    w = ops.bitstack_dequantize_reference(signs, u, v, scale)
    x = torch.randn(3, 21, requires_grad=True)
    torch.ops.quantkit.bitstack_linear(x, signs, u, v, None, scale).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    (x2 @ w.T).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)


_CHECK_ALL_PATHS = """
import torch, quantkit._ops as ops
from quantkit import _C
torch.manual_seed(0)
bad = 0
for (m, n, k) in [(17, 33, 16), (5, 13, 3), (64, 576, 16)]:
    for b in (1, 3):
        signs = torch.randint(0, 256, (b, m, (n + 7) // 8), dtype=torch.uint8)
        if n % 8:
            signs[..., -1] &= (0xFF << (8 - n % 8)) & 0xFF
        for factors in ("float16", "int8"):
            if factors == "int8":
                u = torch.randint(-128, 128, (b, m, k), dtype=torch.int8)
                v = torch.randint(-128, 128, (b, k, n), dtype=torch.int8)
                scale = torch.rand(b, k) * 1e-4
            else:
                u = (torch.randn(b, m, k) * 0.3).half(); v = (torch.randn(b, k, n) * 0.3).half(); scale = None
            w = ops.bitstack_dequantize_reference(signs, u, v, scale)
            for mx in (1, 3, 17):
                x = torch.randn(mx, n)
                y = torch.ops.quantkit.bitstack_linear(x, signs, u, v, None, scale)
                r = ops.bitstack_linear_reference(x, signs, u, v, None, scale)
                bad += int(((y - r).abs() > (x.abs() @ w.abs().T) * 1e-5 + 1e-6).any())
print(_C.bitstack_cpu_isa(), bad)
"""


def _run(code, **env):
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, **env), cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_lower_isa_variants(isa):
    got, bad = _run(_CHECK_ALL_PATHS, QUANTKIT_CPU_ISA=isa)
    if isa == "avx2" and got != "avx2":
        pytest.skip(f"CPU has no AVX2 (kernels run {got})")
    assert bad == "0"


def test_lookup_path_for_every_batch():
    """QUANTKIT_BITSTACK_GEMM_M=1000 keeps m_x = 17 on the lookup kernel (default: rebuild + GEMM)."""
    assert _run(_CHECK_ALL_PATHS, QUANTKIT_BITSTACK_GEMM_M="1000")[1] == "0"
