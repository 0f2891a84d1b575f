"""BitStackLinear: forward = reference dense linear, spec round trip, dtype casts keep the format."""

import torch

from quantkit._ops import bitstack_dequantize_reference
from quantkit.formats import bitstack
from quantkit.nn import PACKED_MODULES, BitStackLinear


def _mod(bias=True):
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    return BitStackLinear.from_weight(w, torch.randn(24) if bias else None, n_blocks=3, rank=4), w


def test_forward_matches_dense_and_prefixes():
    mod, w = _mod()
    x = torch.randn(5, 40)
    for b in (1, 2, 3):
        mod.set_loaded(b)
        wb = bitstack.reconstruct(mod.packed())
        torch.testing.assert_close(mod(x), x @ wb.T + mod.bias, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mod.dequantized_weight(), bitstack_dequantize_reference(*mod.packed().__dict__.values()))
    assert mod.bits_per_weight() == 8 * 3 * bitstack.block_bytes(24, 40, 4) / (24 * 40)


def test_spec_roundtrip_and_state_dict():
    mod, _ = _mod()
    mod.order = [3, 9]
    spec = mod.spec()
    assert PACKED_MODULES[spec["format"]] is BitStackLinear
    assert spec["n_blocks"] == 3 and spec["order"] == [3, 9] and spec["block_bytes"] == bitstack.block_bytes(24, 40, 4)
    sd = mod.state_dict()
    assert set(sd) == {"weight", "weight.u", "weight.v", "bias"}
    # a module holding 2 blocks takes the first 2 of a full state dict
    two = BitStackLinear.from_spec(spec, device="cpu", n_loaded=2)
    two.load_state_dict(sd)
    assert torch.equal(two.signs, mod.signs[:2]) and two.n_loaded == 2
    assert two.spec()["n_blocks"] == 2 and two.spec()["order"] == [3]


def test_dtype_cast_only_touches_bias():
    mod, _ = _mod()
    mod = mod.to(torch.bfloat16)
    assert mod.signs.dtype == torch.uint8 and mod.u.dtype == torch.float16 and mod.bias.dtype == torch.bfloat16
    y = mod(torch.randn(2, 40, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
