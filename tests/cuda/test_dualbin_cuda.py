"""CUDA dualbin kernels (csrc/cuda/dualbin_gemv.cu) against the pure-torch reference on the
same packed data. Skipped without a GPU or a CUDA build of quantkit._C; the nvcc compile
check (test_nvcc_compile.py) covers the .cu everywhere.

Tolerances as for the CPU kernel (tests/ops/test_dualbin_kernel.py): fp32 summation order
(1e-5 of sum |x||W|), plus one ulp of the output dtype for bf16/fp16.
"""

import pytest
import torch

import quantkit._ops as ops
from quantkit.formats import dualbin

CUDA_KERNEL = (torch.cuda.is_available()
               and bool(torch._C._dispatch_has_kernel_for_dispatch_key("quantkit::dualbin_linear", "CUDA")))
pytestmark = pytest.mark.skipif(not CUDA_KERNEL, reason="needs a GPU and a CUDA build of quantkit._C")

# (N, K): aligned, K with a short last group, N not a multiple of the 4 rows per CTA,
# more than 32 groups per row (several warp-wide group loads).
SHAPES = [(256, 512), (96, 576), (33, 200), (7, 70), (5, 129), (130, 4096), (3, 1001)]
MS = [1, 2, 3, 8, 9, 33]


def _args(q, device="cuda"):
    n, k = q.state.shape
    return [q.plane1.to(device), q.plane2.to(device), q.alpha1.to(device), q.alpha2.to(device), q.state.group, n, k]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_dequantize_bit_exact(n, k, group):
    q = dualbin.quantize(torch.randn(n, k), group)
    got = torch.ops.quantkit.dualbin_dequantize(*_args(q)).cpu()
    assert torch.equal(got, dualbin.dequantize(q))


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [64, 128])
def test_linear_matches_reference(n, k, m, dtype, group):
    g = torch.Generator().manual_seed(n * k + m)
    q = dualbin.quantize(torch.randn(n, k, generator=g), group)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g) if m % 2 else None
    y = torch.ops.quantkit.dualbin_linear(x.cuda(), *_args(q), None if bias is None else bias.cuda()).cpu()
    ref = ops.dualbin_linear_reference(x, *_args(q, "cpu"), bias)
    assert y.dtype == dtype and y.shape == (m, n)
    w = dualbin.dequantize(q)
    bound = (x.float().abs() @ w.abs().T) * 1e-5 + 1e-6
    if dtype != torch.float32:
        bound = bound + ref.float().abs() * {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    assert ((y.float() - ref.float()).abs() <= bound).all()


def test_module_on_gpu_matches_cpu():
    from torch import nn

    from quantkit.nn import DualBinLinear

    mod = DualBinLinear.from_linear(nn.Linear(576, 192))
    x = torch.randn(2, 5, 576)
    torch.testing.assert_close(mod.cuda()(x.cuda()).cpu(), mod.cpu()(x), atol=1e-4, rtol=1e-4)
