"""dualbin (DB-LLM FDB) format: exact pack/unpack, bit order, padding, and the 2-bit RTN init."""

import pytest
import torch

from quantkit.errors import FormatError
from quantkit.formats import dualbin


def test_pack_bits_lsb_first_exact():
    bits = torch.zeros(2, 16, dtype=torch.uint8)
    bits[0, 0] = 1            # byte 0 bit 0
    bits[0, 9] = 1            # byte 1 bit 1
    bits[1, 7] = 1            # byte 0 bit 7
    bits[1, 8:16] = 1         # byte 1 = 0xFF
    packed = dualbin.pack_bits(bits)
    assert packed.tolist() == [[0x01, 0x02], [0x80, 0xFF]]
    assert torch.equal(dualbin.unpack_bits(packed, 16), bits)


@pytest.mark.parametrize("n,kp", [(1, 8), (3, 64), (5, 192)])
def test_pack_unpack_round_trip(n, kp):
    g = torch.Generator().manual_seed(n * kp)
    bits = torch.randint(0, 2, (n, kp), generator=g, dtype=torch.uint8)
    assert torch.equal(dualbin.unpack_bits(dualbin.pack_bits(bits), kp), bits)


def test_group_of_64_is_one_little_endian_uint64():
    """The CPU kernel reads a group's 64 bits as one uint64: bit k of it is element k."""
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(0, 2, (1, 64), generator=g, dtype=torch.uint8)
    word = int.from_bytes(bytes(dualbin.pack_bits(bits)[0].tolist()), "little")
    assert [(word >> k) & 1 for k in range(64)] == bits[0].tolist()


@pytest.mark.parametrize("init", ["absmax", "mse"])
@pytest.mark.parametrize("shape", [(4, 64), (3, 130), (7, 200)])
def test_init_reproduces_2bit_rtn(init, shape):
    """FDB at init == RTN on the {-1, 0, 1, 2}·s grid, computed independently here."""
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g)
    q = dualbin.quantize(w, 64, init)
    s = (-q.alpha2.float())                                      # alpha2 = -s
    assert torch.equal(q.alpha1.float(), 2 * s)                  # alpha1 = 2s exactly (fp16)
    cols = torch.arange(shape[1]) // 64
    s_full = s[:, cols]
    rtn = torch.clamp(torch.round(w / s_full), -1, 2) * s_full
    assert torch.equal(dualbin.dequantize(q), rtn)


def test_absmax_init_step_is_half_absmax():
    w = torch.zeros(1, 64)
    w[0, 3] = -3.0
    w[0, 5] = 1.0
    q = dualbin.quantize(w, 64, "absmax")
    assert q.alpha1.item() == 3.0 and q.alpha2.item() == -1.5


def test_mse_init_is_never_worse_than_absmax():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g) * torch.rand(32, 1, generator=g)
    err = {i: (dualbin.dequantize(dualbin.quantize(w, 64, i)) - w).pow(2).sum().item() for i in dualbin.INIT_METHODS}
    assert err["mse"] <= err["absmax"] * 0.9  # the search (sign + clip) must actually help on Gaussians


def test_padding_k_not_multiple_of_group():
    """K = 100 at group 64: padded to 128 columns of bits, the padding bits stay 0."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 100, generator=g)
    q = dualbin.quantize(w, 64)
    assert q.plane1.shape == (3, 16) and q.alpha1.shape == (3, 2)
    for plane in (q.plane1, q.plane2):
        assert dualbin.unpack_bits(plane, 128)[:, 100:].sum() == 0
    assert dualbin.dequantize(q).shape == (3, 100)


def test_bits_per_weight():
    assert dualbin.DualBinState((576, 1536), 64).bits_per_weight() == 2.5
    assert dualbin.DualBinState((8, 100), 64).bits_per_weight() == pytest.approx((2 * 128 + 64) / 100)


def test_encode_is_nearest_level_for_trained_scales():
    """After training the scales are arbitrary: every weight must map to its nearest level."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 128, generator=g)
    a1 = (torch.rand(5, 2, generator=g) + 0.5).half()
    a2 = (-torch.rand(5, 2, generator=g) - 0.1).half()
    b1, b2 = dualbin.encode(w, a1, a2, 64)
    q = dualbin.pack(b1, b2, a1, a2, (5, 128), 64)
    wq = dualbin.dequantize(q)
    lv = dualbin.levels(a1, a2)[:, torch.arange(128) // 64]       # [5, 128, 4]
    best = (w.unsqueeze(-1) - lv).abs().amin(-1)
    assert torch.equal((wq - w).abs(), best)


def test_bad_input():
    with pytest.raises(FormatError, match="group 48"):
        dualbin.quantize(torch.randn(2, 64), 48)
    with pytest.raises(FormatError, match="2-D"):
        dualbin.quantize(torch.randn(2, 3, 64))
    with pytest.raises(FormatError, match="init"):
        dualbin.quantize(torch.randn(2, 64), 64, "minmax")
    with pytest.raises(FormatError, match="float32"):
        dualbin.quantize(torch.ones(2, 64, dtype=torch.int32))
