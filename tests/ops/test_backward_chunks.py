"""The packed ops' backward (grad_x = grad_y @ W, W dequantized a row chunk at a time,
quantkit/_row_chunks.py) against autograd through the reference dequantized weight.

Every format, odd shapes (out not a multiple of the chunk, in not a multiple of the nf4
block or dual-binary group), m = 1, 3, 17, chunks of 1 row up to the whole weight, fp32 and
bf16 activations. Runs on whatever kernels are loaded (native dequantize where built).
"""

import pytest
import torch

from quantkit import _row_chunks
from quantkit.formats import intk
from quantkit.nn import BitStackLinear, DenseLinear, DualBinLinear, IntKLinear, Lut4Linear

# (out, in): in=50 and 96 are not multiples of block 64 (nf4 blocks straddle rows), 37/70
# rows are not multiples of any chunk below; (300, 40) exceeds the default 256-row chunk
SHAPES = [(37, 50), (70, 96), (300, 40)]
FORMATS = ["nf4", "fp4-nodq", "intk3", "dualbin", "bitstack", "bitstack-int8", "dense"]


def make(fmt: str, out_f: int, in_f: int, seed: int = 0, bias: bool = True) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    w, b = lin.weight.data, lin.bias
    if fmt == "nf4":
        return Lut4Linear.from_linear(lin, "nf4", 64, True)
    if fmt == "fp4-nodq":
        return Lut4Linear.from_linear(lin, "fp4", 32, False)
    if fmt == "intk3":
        return IntKLinear.from_packed(intk.quantize_rows(w, 3), b)
    if fmt == "dualbin":
        return DualBinLinear.from_linear(lin, 64)
    if fmt.startswith("bitstack"):
        return BitStackLinear.from_weight(w, b, n_blocks=3, rank=2,
                                          factor_dtype="int8" if fmt.endswith("int8") else "float16")
    if fmt == "dense":
        return DenseLinear.from_weight(w, "bfloat16", b)
    raise ValueError(fmt)


def _reference_grads(mod, x, gy):
    """(grad_x, grad_bias) of (x.float() @ W.T + b) · gy with W the reference dequantization."""
    w = mod.dequantized_weight().float()
    xr = x.detach().float().requires_grad_(True)
    b = None if mod.bias is None else mod.bias.detach().float().requires_grad_(True)
    y = xr @ w.T + (0 if b is None else b)
    y.backward(gy.float())
    return xr.grad, None if b is None else b.grad


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("chunk", [1, 16, 256])
def test_grad_x_matches_reference(fmt, shape, m, chunk):
    out_f, in_f = shape
    mod = make(fmt, out_f, in_f)
    mod.bias.requires_grad_(True)
    x = torch.randn(m, in_f, requires_grad=True)
    gy = torch.randn(m, out_f)
    with _row_chunks.grad_chunk_rows(chunk):
        mod(x).backward(gy)
    ref_x, ref_b = _reference_grads(mod, x, gy)
    # fp32 both ways; only the summation order differs (chunks of rows, MKL vs reference)
    torch.testing.assert_close(x.grad, ref_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.bias.grad.float(), ref_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_grad_x_bf16_and_batched(fmt):
    """x bf16 [2, 5, in]: grad_x comes back bf16, = the fp32 reference rounded once."""
    mod = make(fmt, 70, 96, bias=False)
    x = torch.randn(2, 5, 96).bfloat16().requires_grad_(True)
    gy = torch.randn(2, 5, 70).bfloat16()
    with _row_chunks.grad_chunk_rows(16):
        mod(x).backward(gy)
    ref_x, _ = _reference_grads(mod, x, gy)
    assert x.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape
    torch.testing.assert_close(x.grad.float(), ref_x, rtol=2 ** -7, atol=1e-2)


def test_lut4_rows_are_the_dequantized_rows():
    """Chunks decoded from a block boundary before them give exactly rows r0..r1 (exact: the
    same op on the same codes and scales), for chunks that start mid-block and mid-byte."""
    mod = make("nf4", 37, 51)  # 51 odd: rows start on odd elements, i.e. mid-byte
    full = mod.dequantized_weight()
    rows = _row_chunks.lut4_rows(*mod._op_weight_args()[:3], mod.state.blocksize, 37, 51,
                                 *mod._op_weight_args()[3:])
    for r0, r1 in [(0, 1), (1, 2), (3, 10), (5, 37), (36, 37), (0, 37)]:
        assert torch.equal(rows(r0, r1), full[r0:r1]), (r0, r1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_backward_never_builds_the_whole_weight(fmt, float_shapes):
    """No op outside the forward kernel returns a float tensor of W's [out, in] or [in, out]
    shape in forward + backward; the backward's dequantize calls return chunks.

    What this covers: tensors made by ops that go through the dispatcher (the Python-side
    chunk loop and everything it calls). It cannot see inside one native kernel call: the
    CPU forward kernel of a large batch dequantizes into its own tile buffer (~8 MB, the
    whole weight when the layer is smaller, freed before the op returns,
    csrc/ops/common.h tiled_dequant_mm)."""
    out_f, in_f = 70, 96
    mod = make(fmt, out_f, in_f)
    x = torch.randn(2, 9, in_f, requires_grad=True)
    with _row_chunks.grad_chunk_rows(16), float_shapes() as rec:
        mod(x).square().sum().backward()
    assert (out_f, in_f) not in rec.shapes and (in_f, out_f) not in rec.shapes, rec.shapes
    if fmt != "dense":
        assert len(rec.dequant_calls) == -(-out_f // 16), rec.dequant_calls
        assert all(s[0] * s[1] <= 16 * in_f + 64 for s in rec.dequant_calls), rec.dequant_calls


def test_dense_by_rows_matches_f_linear():
    """DenseLinear's training path (row chunks) = F.linear on the widened weight."""
    mod = make("dense", 70, 96)
    x = torch.randn(3, 96, requires_grad=True)
    with _row_chunks.grad_chunk_rows(16):
        y = mod(x)
    ref = torch.nn.functional.linear(x.detach(), mod.weight.float(), mod.bias)
    torch.testing.assert_close(y.detach(), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference keeps F.linear
        assert torch.equal(mod(x), ref)


def test_chunk_rows_setting():
    assert _row_chunks.chunk_rows() == _row_chunks.DEFAULT_CHUNK_ROWS
    with _row_chunks.grad_chunk_rows(5):
        assert list(_row_chunks.row_chunks(12)) == [(0, 5), (5, 10), (10, 12)]
    assert _row_chunks.chunk_rows() == _row_chunks.DEFAULT_CHUNK_ROWS
    with pytest.raises(ValueError):
        with _row_chunks.grad_chunk_rows(0):
            pass
