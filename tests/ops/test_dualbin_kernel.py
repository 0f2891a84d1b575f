"""dualbin ops: native CPU kernel vs the pure-torch reference on the same packed data; opcheck.

The reference-only checks (opcheck, autograd, shape errors) run everywhere; the kernel
comparisons need quantkit._C (CI builds it).
"""

import os
import subprocess
import sys

import pytest
import torch

import quantkit._ops as ops
from quantkit.formats import dualbin

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
native = pytest.mark.skipif(not ops.has_native_cpu_kernel("dualbin_linear"),
                            reason=f"quantkit._C CPU kernels not loaded: {ops.native_status()}")

# (N, K): aligned, K with a short last group (100, 130, 577), K < group, N = 1.
SHAPES = [(64, 128), (33, 576), (5, 100), (9, 130), (6, 577), (1, 64), (3, 10), (17, 1000)]


def _quant(n, k, group=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dualbin.quantize(torch.randn(n, k, generator=g), group, "mse")


def _wargs(q):
    n, k = q.state.shape
    return [q.plane1, q.plane2, q.alpha1, q.alpha2, q.state.group, n, k]


def _bound(x, w, ref, dtype):
    """Elementwise error bound: fp32 summation order (k*eps*|x||W| with margin); for bf16/fp16
    outputs one ulp of the result (2^-7 / 2^-10 relative): both round an fp32 value that
    differs only in summation order, which can land on either side of a rounding boundary."""
    mag = x.float().abs() @ w.abs().T
    if dtype == torch.float32:
        return mag * 1e-5 + 1e-6
    ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    return mag * 1e-5 + ref.float().abs() * ulp + 1e-6


@native
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_dequantize_bit_exact(n, k, group):
    q = _quant(n, k, group)
    args = _wargs(q)
    assert torch.equal(torch.ops.quantkit.dualbin_dequantize(*args), ops.dualbin_dequantize_reference(*args))
    assert torch.equal(ops.dualbin_dequantize_reference(*args), dualbin.dequantize(q))


@native
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 5, 17])  # 5 = a block of 4 + 1; 17 > 8 = dequant + sgemm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_matches_reference(n, k, m, dtype):
    q = _quant(n, k, 64, seed=m)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if m % 2 else None
    args = _wargs(q)
    y = torch.ops.quantkit.dualbin_linear(x, *args, bias)
    ref = ops.dualbin_linear_reference(x, *args, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    w = dualbin.dequantize(q)
    assert ((y.float() - ref.float()).abs() <= _bound(x, w, ref, dtype)).all()


@native
def test_identity_reproduces_dequantized_weight():
    q = _quant(20, 130)
    y = torch.ops.quantkit.dualbin_linear(torch.eye(130), *_wargs(q), None)
    assert torch.equal(y.T, dualbin.dequantize(q))


@native
def test_3d_and_noncontiguous_input():
    q = _quant(12, 192)
    x = torch.randn(2, 3, 384)[..., ::2]
    y = torch.ops.quantkit.dualbin_linear(x, *_wargs(q), None)
    torch.testing.assert_close(y, ops.dualbin_linear_reference(x, *_wargs(q), None), atol=1e-4, rtol=1e-5)


_CHECK_ALL_PATHS = """
import torch, quantkit._ops as ops
from quantkit.formats import dualbin
torch.manual_seed(0)
bad = []
for (n, k) in [(40, 256), (7, 70), (6, 577), (3, 96)]:
    q = dualbin.quantize(torch.randn(n, k), 64)
    a = [q.plane1, q.plane2, q.alpha1, q.alpha2, 64, n, k]
    W = ops.dualbin_dequantize_reference(*a)
    for m in (1, 2, 5, 9, 20):
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k).to(dt)
            b = torch.randn(n)
            y = torch.ops.quantkit.dualbin_linear(x, *a, b).float()
            r = ops.dualbin_linear_reference(x, *a, b).float()
            bound = (x.float().abs() @ W.abs().T) * 1e-5 + (r.abs() * 2.0 ** -7 if dt != torch.float32 else 0) + 1e-6
            if ((y - r).abs() > bound).any():
                bad.append((n, k, m, dt))
from quantkit import _C
print(_C.dualbin_cpu_isa(), len(bad), bad[:3])
"""


def _run(code: str, **env) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, **env), cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@native
def test_scalar_variant_matches_reference():
    out = _run(_CHECK_ALL_PATHS, QUANTKIT_CPU_ISA="scalar")
    assert out.split()[:2] == ["scalar", "0"], out


@native
def test_gemm_path_matches_reference():
    """QUANTKIT_DUALBIN_GEMM_M=0 sends every batch through dequantize tiles + MKL sgemm."""
    out = _run(_CHECK_ALL_PATHS, QUANTKIT_DUALBIN_GEMM_M="0")
    assert out.split()[1] == "0", out


def test_zero_batch():
    q = _quant(8, 64)
    y = torch.ops.quantkit.dualbin_linear(torch.randn(0, 64), *_wargs(q), torch.ones(8))
    assert y.shape == (0, 8)


def test_shape_errors_name_the_shapes():
    q = _quant(8, 100)
    with pytest.raises(RuntimeError, match="last dim 99"):
        torch.ops.quantkit.dualbin_linear(torch.randn(2, 99), *_wargs(q), None)
    args = _wargs(q)
    args[0] = q.plane1[:, :-1].contiguous()
    with pytest.raises(RuntimeError, match=r"\[8, 16\]"):
        torch.ops.quantkit.dualbin_linear(torch.randn(2, 100), *args, None)
    args = _wargs(q)
    args[2] = q.alpha1.float()
    with pytest.raises(RuntimeError, match="float16"):
        torch.ops.quantkit.dualbin_linear(torch.randn(2, 100), *args, None)


def test_opcheck():
    q = _quant(24, 100)
    torch.library.opcheck(torch.ops.quantkit.dualbin_linear.default, (torch.randn(3, 100), *_wargs(q), torch.randn(24)))
    x = torch.randn(2, 100, requires_grad=True)
    torch.library.opcheck(torch.ops.quantkit.dualbin_linear.default, (x, *_wargs(q), None))
    torch.library.opcheck(torch.ops.quantkit.dualbin_dequantize.default, tuple(_wargs(q)))


def test_autograd_to_x_and_bias():
    q = _quant(6, 70)
    x = torch.randn(3, 70, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    torch.ops.quantkit.dualbin_linear(x, *_wargs(q), b).pow(2).sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (x2 @ dualbin.dequantize(q).T + b2).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.grad, b2.grad, atol=1e-4, rtol=1e-4)
