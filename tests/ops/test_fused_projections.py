"""lut4_linear_multi (fused q/k/v and gate/up): against one lut4_linear call per weight (bit for
bit on the native fused path) and against the pure-torch reference, over odd shapes."""

import os
import subprocess
import sys

import pytest
import torch

import quantkit._ops as ops
from quantkit.formats import lut4

pytestmark = pytest.mark.skipif(not ops.has_native_cpu_kernel("lut4_linear_multi"),
                                reason=f"quantkit._C fused kernel not loaded: {ops.native_status()}")

# (out_features per weight, K, blocksize, double quant): SmolLM2's q/k/v and gate/up, a K that is
# not a multiple of 32 (the per-weight fallback), one weight, and blocksize 128 without double quant
GROUPS = [((576, 192, 192), 576, 64, True), ((1536, 1536), 576, 64, True), ((7, 5, 9), 70, 64, True),
          ((33, 17), 96, 32, False), ((40,), 128, 64, True), ((3, 64, 1), 256, 128, True)]


def _weights(sizes, k, bs, dq, seed=0):
    g = torch.Generator().manual_seed(seed + k + sum(sizes))
    return [lut4.quantize(torch.randn(n, k, generator=g), "nf4", bs, dq) for n in sizes]


def _single_args(q, bias=None):
    n, k = q.state.shape
    return (q.packed, q.absmax, q.quant_map, q.state.blocksize, n, k, bias, q.nested_quant_map, q.nested_absmax,
            q.state.nested_offset if q.state.nested else 0.0, 256)


def _multi_args(qs, k, biases):
    cols = list(zip(*[_single_args(q, b) for q, b in zip(qs, biases)]))
    packed, absmax, code, bs, ns, _, b, ac, asc, ao, abs_ = cols
    return (list(packed), list(absmax), list(code), list(bs), list(ns), k, list(b), list(ac), list(asc), list(ao),
            list(abs_))


@pytest.mark.parametrize("sizes,k,bs,dq", GROUPS)
@pytest.mark.parametrize("m", [1, 3, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_multi_equals_single_calls(sizes, k, bs, dq, m, dtype, with_bias):
    qs = _weights(sizes, k, bs, dq)
    biases = [torch.randn(n).to(dtype) if with_bias and j % 2 == 0 else None for j, n in enumerate(sizes)]
    x = torch.randn(2, m, k).to(dtype) if m > 1 else torch.randn(1, k).to(dtype)
    y = torch.ops.quantkit.lut4_linear_multi(x, *_multi_args(qs, k, biases))
    single = torch.cat([torch.ops.quantkit.lut4_linear(x, *_single_args(q, b)) for q, b in zip(qs, biases)], -1)
    assert y.shape == single.shape and y.dtype == dtype
    # the same kernel per column block (fused small-m path, or per-weight calls): bit-identical
    assert torch.equal(y, single)
    ref = ops._ops_fused.lut4_linear_multi_reference(x, *_multi_args(qs, k, biases))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * (ref.float().abs().max().item() + 1))


def test_bad_lists_are_clear_errors():
    qs = _weights((8, 8), 64, 64, True)
    args = list(_multi_args(qs, 64, [None, None]))
    args[4] = [8]  # out_features with one entry for two weights
    with pytest.raises(RuntimeError, match="every per-weight list must have 2 entries"):
        torch.ops.quantkit.lut4_linear_multi(torch.randn(1, 64), *args)
    with pytest.raises(RuntimeError, match="last dim 63"):
        torch.ops.quantkit.lut4_linear_multi(torch.randn(1, 63), *_multi_args(qs, 64, [None, None]))


def test_opcheck():
    qs = _weights((12, 4), 64, 64, True)
    torch.library.opcheck(torch.ops.quantkit.lut4_linear_multi.default,
                          (torch.randn(3, 64), *_multi_args(qs, 64, [torch.randn(12), None])),
                          test_utils=("test_schema", "test_faketensor"))


_CHECK_SCALAR = """
import torch, quantkit._ops as ops
from quantkit.formats import lut4
qs = [lut4.quantize(torch.randn(n, 576), "nf4", 64, True) for n in (576, 192, 192)]
a = lambda q: (q.packed, q.absmax, q.quant_map, 64, q.state.shape[0], 576, None, q.nested_quant_map, q.nested_absmax,
               q.state.nested_offset, 256)
cols = list(zip(*[a(q) for q in qs]))
x = torch.randn(1, 576)
y = torch.ops.quantkit.lut4_linear_multi(x, list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]), list(cols[4]),
                                         576, list(cols[6]), list(cols[7]), list(cols[8]), list(cols[9]), list(cols[10]))
s = torch.cat([torch.ops.quantkit.lut4_linear(x, *a(q)) for q in qs], -1)
print(bool(torch.equal(y, s)))
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_lower_isa(isa):
    """AVX2 runs the fused path with its own kernel; scalar falls back to per-weight calls."""
    res = subprocess.run([sys.executable, "-c", _CHECK_SCALAR], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, QUANTKIT_CPU_ISA=isa))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True", res.stdout
