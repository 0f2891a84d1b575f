"""BitStack CUDA kernel vs the pure-torch reference on the same blocks (needs a GPU and a CUDA
build of quantkit; skipped otherwise). Not run on the dev machine, which has no GPU."""

import pytest
import torch

import quantkit._ops as ops

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available()
    or not torch._C._dispatch_has_kernel_for_dispatch_key("quantkit::bitstack_linear", "CUDA"),
    reason="needs a GPU and quantkit built with CUDA")


def _blocks(b, m, n, k, seed=0, factors="float16"):
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 256, (b, m, (n + 7) // 8), dtype=torch.uint8, generator=g)
    if n % 8:
        signs[..., -1] &= (0xFF << (8 - n % 8)) & 0xFF
    if factors == "int8":
        u = torch.randint(-128, 128, (b, m, k), dtype=torch.int8, generator=g)
        v = torch.randint(-128, 128, (b, k, n), dtype=torch.int8, generator=g)
        return signs, u, v, torch.rand(b, k, generator=g) * 1e-4
    u = (torch.randn(b, m, k, generator=g) * 0.3).half()
    v = (torch.randn(b, k, n, generator=g) * 0.3).half()
    return signs, u, v, None


@pytest.mark.parametrize("factors", ["float16", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 16, 17])  # 17: the rebuild + GEMM path
@pytest.mark.parametrize("m,n,k", [(1, 1, 4), (17, 33, 16), (129, 130, 8), (576, 1536, 16), (40, 7, 32), (9, 20, 5)])
@pytest.mark.parametrize("b", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemv_matches_reference(rows, m, n, k, b, dtype, factors):
    signs, u, v, scale = _blocks(b, m, n, k, seed=m + n + b, factors=factors)
    x = torch.randn(rows, n).to(dtype)
    bias = torch.randn(m)
    ref = ops.bitstack_linear_reference(x, signs, u, v, bias, scale).float()
    y = torch.ops.quantkit.bitstack_linear(x.cuda(), signs.cuda(), u.cuda(), v.cuda(), bias.cuda(),
                                           None if scale is None else scale.cuda()).cpu()
    w = ops.bitstack_dequantize_reference(signs, u, v, scale)
    mag = x.float().abs() @ w.abs().T + 1e-6
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -7
    assert y.dtype == dtype and y.shape == ref.shape
    assert ((y.float() - ref).abs() <= mag * tol + ref.abs() * tol).all()
