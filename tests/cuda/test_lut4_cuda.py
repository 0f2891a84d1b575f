"""CUDA lut4 kernels (csrc/cuda/lut4_gemv.cu) against the pure-torch reference on the same
packed data. Skipped without a GPU or without a CUDA build of quantkit._C (see README,
"CUDA build"); nvcc compile checks run everywhere (test_nvcc_compile.py).

Tolerances: fp32 x: 1e-5 of max|ref| (the kernel sums in a different order, fp32
throughout). bf16/fp16 x at m <= 8 (fused GEMV, fp32 weights): 1e-2 relative, the output
rounding of the dtype. m > 8 (dequantize to x.dtype + cuBLAS): the weight itself is rounded
to x.dtype (2^-9 relative per weight for bf16), so it is compared with the reference applied
to that rounded weight (same 1e-2), as the CPU kernel tests do.
"""

import pytest
import torch

import quantkit._ops as ops
from quantkit.formats import lut4

CUDA_KERNEL = torch.cuda.is_available() and ops._has_cuda_kernels()
pytestmark = pytest.mark.skipif(not CUDA_KERNEL, reason="needs a GPU and a CUDA build of quantkit._C")

DEV = "cuda"
# (N, K): aligned LLM-like, K not a multiple of 64/128 (blocks span rows), odd K (rows start
# mid-byte: scalar path), N not a multiple of the 4 rows per CTA.
SHAPES = [(256, 512), (96, 576), (33, 200), (7, 70), (5, 129), (130, 4096), (3, 1001)]
MS = [1, 2, 3, 8, 16, 33, 128]


def _quant(n, k, quant_type, blocksize, double_quant, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lut4.quantize(torch.randn(n, k, generator=g), quant_type, blocksize, double_quant)


def _args(q, n, k, device):
    t = lambda v: None if v is None else v.to(device)  # noqa: E731
    return [t(q.packed), t(q.absmax), t(q.quant_map), q.state.blocksize, n, k, None, t(q.nested_quant_map),
            t(q.nested_absmax), q.state.nested_offset, q.state.nested_blocksize]


def _deq_args(a):
    return (a[1], a[2], a[3], a[4], a[5], a[6], a[8], a[9], a[10], a[11])


def _close(y, ref):
    scale = ref.float().abs().max().item() + 1e-6
    tol = 1e-5 if ref.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), ref.float(), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("n,k", SHAPES)
def test_dequantize_is_bit_exact(quant_type, double_quant, n, k):
    q = _quant(n, k, quant_type, 64, double_quant)
    a = _args(q, n, k, DEV)
    w = torch.ops.quantkit.lut4_dequantize(*_deq_args([None] + a))
    ref = ops.lut4_dequantize_reference(*_deq_args([None] + _args(q, n, k, "cpu")))
    assert torch.equal(w.cpu(), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quant_type,double_quant,blocksize", [("nf4", True, 64), ("fp4", False, 128),
                                                               ("nf4", False, 32)])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_linear_matches_reference(m, n, k, quant_type, double_quant, blocksize, dtype):
    q = _quant(n, k, quant_type, blocksize, double_quant)
    a = _args(q, n, k, DEV)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    a[7] = bias.to(DEV)
    y = torch.ops.quantkit.lut4_linear(x.to(DEV), *a)
    w = ops.lut4_dequantize_reference(*_deq_args([None] + _args(q, n, k, "cpu")))
    if m > 8 and dtype != torch.float32:
        w = w.to(dtype).float()  # the GEMM path rounds the weight to x.dtype first
    ref = ((x.float() @ w.T) + bias.float()).to(dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    _close(y.cpu(), ref)


@pytest.mark.parametrize("m", [1, 8, 64])
def test_identity_reproduces_the_dequantized_weight(m):
    n, k = 96, 576
    q = _quant(n, k, "nf4", 64, True)
    a = _args(q, n, k, DEV)
    w = ops.lut4_dequantize_reference(*_deq_args([None] + _args(q, n, k, "cpu")))
    eye = torch.eye(k)[:m]
    y = torch.ops.quantkit.lut4_linear(eye.to(DEV), *a)
    torch.testing.assert_close(y.cpu(), w[:, :m].T, atol=0, rtol=0)


def test_misaligned_packed_takes_the_scalar_path():
    n, k = 64, 256
    q = _quant(n, k, "nf4", 64, False)
    a = _args(q, n, k, DEV)
    buf = torch.empty(a[0].numel() + 1, dtype=torch.uint8, device=DEV)
    buf[1:].copy_(a[0])
    a[0] = buf[1:]  # data pointer 1 byte off a 16-byte boundary
    x = torch.randn(1, k)
    y = torch.ops.quantkit.lut4_linear(x.to(DEV), *a)
    ref = ops.lut4_linear_reference(x, *_args(q, n, k, "cpu"))
    _close(y.cpu(), ref)


def test_opcheck():
    n, k = 40, 192
    q = _quant(n, k, "nf4", 64, True)
    a = _args(q, n, k, DEV)
    torch.library.opcheck(torch.ops.quantkit.lut4_linear, (torch.randn(3, k, device=DEV), *a))
    torch.library.opcheck(torch.ops.quantkit.lut4_dequantize, _deq_args([None] + a))


def test_whole_model_on_cuda_matches_cpu(tiny_llama_dir, tmp_path):
    import quantkit

    out = quantkit.save(quantkit.compress(quantkit.load_model(tiny_llama_dir), "nf4", progress=False),
                        tmp_path / "nf4")
    cpu = quantkit.load(out)
    gpu = quantkit.load(out).cuda()
    ids = torch.randint(0, cpu.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = cpu(ids).logits
        got = gpu(ids.cuda()).logits.cpu()
    # fp32 throughout; differences come from summation order in the kernels and attention
    torch.testing.assert_close(got, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)
