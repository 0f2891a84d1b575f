"""Row-gather ops on packed tables (intk_embedding, lut4_embedding): native CPU kernel and
pure-torch reference against the rows of the full dequantized table, bit for bit (both
decode each element with the same fp32 expression as the format's dequantize)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantkit._ops as ops
from quantkit._ops_embedding import intk_embedding_reference, lut4_embedding_reference
from quantkit.formats import intk, lut4

REPO = Path(__file__).resolve().parents[2]
native = pytest.mark.skipif(not ops.has_native_cpu_kernel("intk_embedding"),
                            reason=f"quantkit._C embedding kernels not loaded: {ops.native_status()}")

# (rows, cols): aligned; cols odd (rows start on an odd nibble); cols not a multiple of the
# block (rows start inside a block); one row; one column
SHAPES = [(64, 128), (37, 70), (17, 33), (5, 577), (1, 96), (9, 1), (300, 64)]
IDS = [torch.tensor([0]), torch.tensor([[3, 0, 3], [1, 2, 4]]), torch.arange(5).flip(0), torch.tensor([], dtype=torch.long)]


def _ids(rows, ids):
    return ids % rows if ids.numel() else ids


def _lut4_args(rows, cols, bs, dq, quant_type="nf4"):
    q = lut4.quantize(torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 7 + cols)), quant_type,
                      bs, dq)
    return (q.packed.reshape(-1), q.absmax, q.quant_map, bs, rows, cols, q.nested_quant_map, q.nested_absmax,
            float(q.state.nested_offset), 256)


def _intk_args(rows, cols, bits=8):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 5 + cols))
    q = intk.quantize_rows(w, bits)
    return (q.packed, q.scale, bits, q.state.offset, rows, cols)


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("bs,dq", [(64, True), (32, False), (128, True)])
@pytest.mark.parametrize("which", range(len(IDS)))
def test_lut4_rows_equal_the_dequantized_table(rows, cols, bs, dq, which):
    args = _lut4_args(rows, cols, bs, dq)
    ids = _ids(rows, IDS[which])
    full = ops.lut4_dequantize_reference(*args)
    want = full[ids]
    assert torch.equal(lut4_embedding_reference(ids, *args), want)
    got = torch.ops.quantkit.lut4_embedding(ids, *args)  # native when built, else the reference
    assert got.dtype == torch.float32 and got.shape == (*ids.shape, cols) and torch.equal(got, want)


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("which", range(len(IDS)))
def test_intk_rows_equal_the_dequantized_table(rows, cols, bits, which):
    args = _intk_args(rows, cols, bits)
    ids = _ids(rows, IDS[which])
    want = ops.intk_dequantize_reference(*args)[ids]
    assert torch.equal(intk_embedding_reference(ids, *args), want)
    got = torch.ops.quantkit.intk_embedding(ids, *args)
    assert got.dtype == torch.float32 and got.shape == (*ids.shape, cols) and torch.equal(got, want)


@pytest.mark.parametrize("op", ["intk", "lut4"])
@pytest.mark.parametrize("bad", [-1, 37])
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_out_of_range_id_is_named(op, bad, impl):
    args = _intk_args(37, 16) if op == "intk" else _lut4_args(37, 16, 64, True)
    fn = {("intk", "op"): torch.ops.quantkit.intk_embedding, ("lut4", "op"): torch.ops.quantkit.lut4_embedding,
          ("intk", "reference"): intk_embedding_reference, ("lut4", "reference"): lut4_embedding_reference}[op, impl]
    with pytest.raises(IndexError, match=f"token id {bad} is outside the embedding table of 37 rows"):
        fn(torch.tensor([0, bad]), *args)


def test_ops_pass_opcheck():
    ids = torch.tensor([[1, 4], [0, 2]])
    torch.library.opcheck(torch.ops.quantkit.intk_embedding.default, (ids, *_intk_args(5, 33)))
    torch.library.opcheck(torch.ops.quantkit.lut4_embedding.default, (ids, *_lut4_args(5, 33, 64, True)))


def test_bad_table_shape_is_named():
    packed, scale, bits, offset, rows, cols = _intk_args(6, 10)
    with pytest.raises(RuntimeError, match=r"packed must be .*\[6, 10\]"):
        torch.ops.quantkit.intk_embedding(torch.tensor([0]), packed[:, :9].contiguous(), scale, bits, offset, rows,
                                          cols)


_CHECK_ALL_PATHS = """
import torch, quantkit._ops as ops
from quantkit.formats import lut4
bad = []
for rows, cols in [(37, 70), (17, 33), (5, 577), (64, 128)]:
    for bs, dq in ((64, True), (32, False)):
        q = lut4.quantize(torch.randn(rows, cols), "nf4", bs, dq)
        a = (q.packed.reshape(-1), q.absmax, q.quant_map, bs, rows, cols, q.nested_quant_map, q.nested_absmax,
             float(q.state.nested_offset), 256)
        ids = torch.randint(0, rows, (3, 5))
        if not torch.equal(torch.ops.quantkit.lut4_embedding(ids, *a), ops.lut4_dequantize_reference(*a)[ids]):
            bad.append((rows, cols, bs, dq))
from quantkit import _C
print(_C.cpu_isa(), len(bad), bad[:3])
"""


@native
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_lower_isa_variants_match_reference(isa):
    """The lut4 row decode has AVX-512 / AVX2 / scalar variants: force each lower one."""
    res = subprocess.run([sys.executable, "-c", _CHECK_ALL_PATHS], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, QUANTKIT_CPU_ISA=isa), timeout=300)
    assert res.returncode == 0, res.stderr
    got_isa, n_bad = res.stdout.split()[:2]
    if isa == "avx2" and got_isa != "avx2":
        pytest.skip(f"CPU has no AVX2 (kernels run {got_isa})")
    assert n_bad == "0", res.stdout


@native
def test_native_kernel_is_registered_for_both_formats():
    assert ops.has_native_cpu_kernel("lut4_embedding") and ops.has_native_cpu_kernel("intk_embedding")
