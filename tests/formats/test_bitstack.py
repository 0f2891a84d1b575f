"""BitStack format: exact sign packing, decomposition invariants, and error vs blocks (quality)."""

import pytest
import torch

from quantkit.errors import FormatError
from quantkit.formats import bitstack


def test_pack_signs_bit_order_msb_first_per_row():
    s = torch.tensor([[1, -1, -1, -1, -1, -1, -1, -1, -1, 1],      # byte 0 = 0b10000000, byte 1 = 0b01000000
                      [-1, -1, -1, -1, -1, -1, -1, 1, 1, -1]])     # byte 0 = 0b00000001, byte 1 = 0b10000000
    packed = bitstack.pack_signs(s)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2)
    assert packed.tolist() == [[0b10000000, 0b01000000], [0b00000001, 0b10000000]]


@pytest.mark.parametrize("n", [1, 7, 8, 9, 17, 64])
def test_pack_unpack_roundtrip_exact(n):
    g = torch.Generator().manual_seed(n)
    s = torch.where(torch.randn(3, 5, n, generator=g) >= 0, 1.0, -1.0)
    packed = bitstack.pack_signs(s)
    assert packed.shape == (3, 5, (n + 7) // 8)
    assert torch.equal(bitstack.unpack_signs(packed, n), s)
    # padding bits are zero
    if n % 8:
        assert int((packed[..., -1] & ((1 << (8 - n % 8)) - 1)).max()) == 0


def test_sign_of_zero_is_plus_one():
    w = torch.zeros(4, 9)
    w[0, 0] = -1.0
    q = bitstack.quantize(w, n_blocks=1, rank=2)
    s = bitstack.unpack_signs(q.signs[0], 9)
    assert s[0, 0] == -1 and (s.flatten()[1:] == 1).all()


def test_shapes_dtypes_and_block_bytes():
    w = torch.randn(24, 19)
    q = bitstack.quantize(w, n_blocks=3, rank=4)
    assert q.signs.shape == (3, 24, 3) and q.signs.dtype == torch.uint8
    assert q.u.shape == (3, 24, 4) and q.u.dtype == torch.float16
    assert q.v.shape == (3, 4, 19) and q.v.dtype == torch.float16
    per_block = q.signs[0].numel() + 2 * (q.u[0].numel() + q.v[0].numel())
    assert bitstack.block_bytes(24, 19, 4) == per_block


def test_reconstruct_matches_definition():
    w = torch.randn(16, 12)
    q = bitstack.quantize(w, n_blocks=2, rank=3)
    expect = torch.zeros(16, 12)
    for i in range(2):
        s = bitstack.unpack_signs(q.signs[i], 12)
        expect += s * (q.u[i].float() @ q.v[i].float())
    torch.testing.assert_close(bitstack.reconstruct(q, 2), expect)
    torch.testing.assert_close(bitstack.reconstruct(q.prefix(1)), bitstack.reconstruct(q, 1))


def test_bad_input():
    with pytest.raises(FormatError, match="2-D"):
        bitstack.quantize(torch.randn(3))
    with pytest.raises(FormatError, match="svd"):
        bitstack.quantize(torch.randn(3, 3), svd="qr")
    with pytest.raises(FormatError, match="NaN"):
        bitstack.quantize(torch.full((3, 3), float("nan")))
    with pytest.raises(FormatError, match="blocks"):
        bitstack.quantize(torch.randn(4, 4), n_blocks=2).prefix(3)


# --- quality (error vs full precision) ---------------------------------------------------

@pytest.mark.parametrize("svd", ["exact", "lowrank"])
def test_error_decreases_with_blocks(svd):
    torch.manual_seed(0)
    w = torch.randn(96, 80) * torch.rand(1, 80) * 2  # uneven column scales, like a real layer
    q = bitstack.quantize(w, n_blocks=8, rank=8, svd=svd)
    errs = [float((bitstack.reconstruct(q, b) - w).norm() / w.norm()) for b in range(1, 9)]
    # every block removes a sizeable part of the residual; measured at this size (both SVDs):
    # relative error 0.47, 0.23, 0.115, ... 0.008 — about halved per block. Bounds leave
    # margin for BLAS/SVD differences across machines.
    assert all(b < a * 0.8 for a, b in zip(errs, errs[1:])), errs
    assert errs[0] < 0.6 and errs[-1] < 0.03, errs


def test_lowrank_close_to_exact():
    torch.manual_seed(1)
    w = torch.randn(128, 64)
    e_exact = (bitstack.reconstruct(bitstack.quantize(w, 4, 8, "exact")) - w).norm()
    e_low = (bitstack.reconstruct(bitstack.quantize(w, 4, 8, "lowrank")) - w).norm()
    assert e_low < e_exact * 1.10
