"""Native CPU int-k kernels (quantkit._C) against the pure-torch reference on the same packed data."""

import pytest
import torch

import quantkit._ops as ops
from quantkit.formats import intk

pytestmark = pytest.mark.skipif(not ops.has_native_cpu_kernel("intk_linear"),
                                reason=f"quantkit._C int-k kernels not loaded: {ops.native_status()}")

# (N, K): aligned, K not a multiple of 8 / of the codes per byte (tails), K = 1, N = 1
SHAPES = [(64, 128), (7, 70), (5, 100), (6, 577), (3, 601), (1, 96), (1, 1), (17, 33), (40, 13)]
BITS = [1, 2, 3, 4, 5, 8]
GRID_OF = {1: ("sign", 0.5), 2: ("seq", 1.5), 3: ("lsq", 4.0), 4: ("lsq", 8.0), 5: ("lsq", 16.0), 8: ("lsq", 128.0)}


def _weight(n, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed + 31 * n + k + 1000 * bits)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    scale = torch.rand(n, generator=g) * 0.1 + 0.01
    grid, offset = GRID_OF[bits]
    return intk.from_codes(codes, scale, bits, offset, grid)


def _wargs(q):
    n, k = q.state.shape
    return [q.packed, q.scale, q.state.bits, q.state.offset, n, k, None]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_bit_exact(n, k, bits):
    q = _weight(n, k, bits)
    args = (q.packed, q.scale, bits, q.state.offset, n, k)
    out = torch.ops.quantkit.intk_dequantize(*args)
    assert torch.equal(out, ops.intk_dequantize_reference(*args))
    assert torch.equal(out, intk.dequantize(q))


def _close(y, ref):
    assert y.dtype == ref.dtype and y.shape == ref.shape
    scale = ref.float().abs().max().item() + 1e-6
    if ref.dtype == torch.float32:
        torch.testing.assert_close(y, ref, atol=1e-5 * scale, rtol=1e-5)
    else:
        torch.testing.assert_close(y.float(), ref.float(), atol=1e-2 * scale, rtol=1e-2)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 5, 8, 17])
def test_linear_matches_reference(n, k, bits, m):
    """m 1..8 runs the small-m kernel (on AVX-512 the direct-decode one for bits 1/2/4/8: x rows
    in groups of 4, so 5 and 8 cover a partial and a full second group), 17 the GEMM path."""
    q = _weight(n, k, bits)
    x = torch.randn(m, k)
    args = _wargs(q)
    _close(torch.ops.quantkit.intk_linear(x, *args), ops.intk_linear_reference(x, *args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_dtypes_bias(dtype, bits, m, with_bias):
    q = _weight(24, 70, bits)
    x = torch.randn(2, m, 70).to(dtype)  # 3-D input
    args = _wargs(q)
    if with_bias:
        args[6] = torch.randn(24).to(dtype)
    y = torch.ops.quantkit.intk_linear(x, *args)
    assert y.shape == (2, m, 24)
    _close(y, ops.intk_linear_reference(x, *args))


def test_linear_non_contiguous_and_empty():
    q = _weight(9, 40, 4)
    x = torch.randn(40, 5).t()
    _close(torch.ops.quantkit.intk_linear(x, *_wargs(q)), ops.intk_linear_reference(x, *_wargs(q)))
    y = torch.ops.quantkit.intk_linear(torch.randn(0, 40), *_wargs(q))
    assert y.shape == (0, 9)


def test_bad_shapes_are_clear_errors():
    q = _weight(6, 20, 3)
    with pytest.raises(RuntimeError, match="last dim 21"):
        torch.ops.quantkit.intk_linear(torch.randn(2, 21), *_wargs(q))
    args = _wargs(q)
    args[1] = torch.ones(5)
    with pytest.raises(RuntimeError, match=r"scale must be fp32 \[6\]"):
        torch.ops.quantkit.intk_linear(torch.randn(2, 20), *args)
    args = _wargs(q)
    args[2] = 4
    with pytest.raises(RuntimeError, match="packed must be uint8"):
        torch.ops.quantkit.intk_linear(torch.randn(2, 20), *args)


def test_opcheck():
    q = _weight(12, 45, 3)
    args = _wargs(q)
    args[6] = torch.randn(12)
    torch.library.opcheck(torch.ops.quantkit.intk_linear.default, (torch.randn(3, 45), *args))
    torch.library.opcheck(torch.ops.quantkit.intk_linear.default, (torch.randn(2, 45, requires_grad=True), *args))
    torch.library.opcheck(torch.ops.quantkit.intk_dequantize.default, (q.packed, q.scale, 3, q.state.offset, 12, 45))


def test_gradients_to_input_and_bias():
    q = _weight(8, 30, 4)
    w = intk.dequantize(q)
    x = torch.randn(3, 30, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    args = _wargs(q)
    args[6] = b
    torch.ops.quantkit.intk_linear(x, *args).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_()
    (x2 @ w.T + b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-5)


_CHECK_GENERIC = """
import torch, quantkit._ops as ops
from quantkit.formats import intk
bad = []
for bits, grid, off in ((1, "sign", 0.5), (2, "seq", 1.5), (4, "lsq", 8.0), (8, "lsq", 128.0)):
    for n, k in ((7, 70), (64, 128), (3, 601), (1, 1)):
        g = torch.Generator().manual_seed(n + k + bits)
        q = intk.from_codes(torch.randint(0, 2 ** bits, (n, k), generator=g), torch.rand(n, generator=g) + 0.01,
                            bits, off, grid)
        for m in (1, 4, 6):
            x = torch.randn(m, k, generator=g)
            a = (x, q.packed, q.scale, bits, off, n, k, None)
            y, r = torch.ops.quantkit.intk_linear(*a), ops.intk_linear_reference(*a)
            if not torch.allclose(y, r, rtol=1e-5, atol=1e-5 * (r.abs().max().item() + 1e-6)):
                bad.append((bits, n, k, m))
print(len(bad), bad[:3])
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_generic_small_m_kernel_matches_reference(isa):
    """QUANTKIT_CPU_ISA below AVX-512 keeps bits 1/2/4/8 on the row-buffer kernel, which AVX-512
    machines otherwise no longer run for those widths."""
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _CHECK_GENERIC], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, QUANTKIT_CPU_ISA=isa))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "0", res.stdout
