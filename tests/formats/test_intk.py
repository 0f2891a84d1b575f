"""int-k packed format: exact pack/unpack, the documented bit layout, state validation."""

import pytest
import torch

from quantkit.errors import FormatError
from quantkit.formats import intk


@pytest.mark.parametrize("bits", list(range(1, 9)))
@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (5, 33), (4, 64), (2, 577)])
def test_pack_unpack_exact(bits, n, k):
    g = torch.Generator().manual_seed(bits * 100 + k)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    packed = intk.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (n, intk.row_bytes(k, bits))
    assert torch.equal(intk.unpack_codes(packed, bits, k), codes)


def test_bit_layout_is_lsb_first_per_row():
    # 3-bit codes 1, 2, 7 -> stream bits (LSB first) 100 010 111 -> byte0 = 0b11010001, byte1 = 0b1
    packed = intk.pack_codes(torch.tensor([[1, 2, 7], [0, 0, 1]]), 3)
    assert packed.tolist() == [[0b11010001, 0b1], [0b01000000, 0]]
    # 4-bit: first code in the low nibble
    assert intk.pack_codes(torch.tensor([[0x3, 0xA]]), 4).tolist() == [[0xA3]]


def test_unused_high_bits_are_zero():
    packed = intk.pack_codes(torch.full((2, 5), 3), 2)  # 10 bits per row -> 2 bytes, 6 unused bits
    assert (packed[:, 1] >> 2).eq(0).all()


def test_dequantize_formula():
    codes = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    q = intk.from_codes(codes, torch.tensor([0.5, 2.0]), 2, 1.5, "seq")
    expected = (codes.float() - 1.5) * torch.tensor([[0.5], [2.0]])
    assert torch.equal(intk.dequantize(q), expected)


def test_bits_per_weight_counts_padding_and_scales():
    s = intk.IntKState(3, 4.0, "lsq", (10, 7))
    assert s.row_bytes == 3
    assert s.bits_per_weight() == pytest.approx((8 * 3 * 10 + 32 * 10) / 70)
    assert intk.IntKState(4, 8.0, "lsq", (64, 4096)).bits_per_weight() == pytest.approx(4 + 32 / 4096)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=9, offset=0.0, grid="lsq", shape=(2, 2)), "bits"),
    (dict(bits=2, offset=0.25, grid="seq", shape=(2, 2)), "offset"),
    (dict(bits=2, offset=4.0, grid="seq", shape=(2, 2)), "offset"),
    (dict(bits=2, offset=1.5, grid="nf4", shape=(2, 2)), "grid"),
    (dict(bits=2, offset=1.5, grid="seq", shape=(0, 2)), "shape"),
])
def test_bad_state(kwargs, match):
    with pytest.raises(FormatError, match=match):
        intk.IntKState(**kwargs)


def test_codes_out_of_range_and_bad_scale():
    with pytest.raises(FormatError, match=r"\[0, 3\]"):
        intk.pack_codes(torch.tensor([[4]]), 2)
    with pytest.raises(FormatError, match="finite"):
        intk.from_codes(torch.zeros(1, 4, dtype=torch.long), torch.tensor([float("nan")]), 2, 1.5, "seq")
    with pytest.raises(FormatError, match="rows"):
        intk.from_codes(torch.zeros(2, 4, dtype=torch.long), torch.ones(3), 2, 1.5, "seq")
