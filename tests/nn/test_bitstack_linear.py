"""BitStackLinear: forward = reference dense linear, spec round trip, dtype casts keep the format."""

import pytest
import torch

from quantkit._ops import bitstack_dequantize_reference
from quantkit.formats import bitstack
from quantkit.nn import PACKED_MODULES, BitStackLinear


FACTORS = pytest.mark.parametrize("factors", ["float16", "int8"])


def _mod(bias=True, factors="float16"):
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    return BitStackLinear.from_weight(w, torch.randn(24) if bias else None, n_blocks=3, rank=4,
                                      factor_dtype=factors), w


@FACTORS
def test_forward_matches_dense_and_prefixes(factors):
    mod, w = _mod(factors=factors)
    x = torch.randn(5, 40)
    for b in (1, 2, 3):
        mod.set_loaded(b)
        wb = bitstack.reconstruct(mod.packed())
        torch.testing.assert_close(mod(x), x @ wb.T + mod.bias, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mod.dequantized_weight(), bitstack_dequantize_reference(*mod.packed().__dict__.values()))
    assert mod.bits_per_weight() == 8 * 3 * bitstack.block_bytes(24, 40, 4, factors) / (24 * 40)


@FACTORS
def test_spec_roundtrip_and_state_dict(factors):
    mod, _ = _mod(factors=factors)
    mod.order = [3, 9]
    spec = mod.spec()
    assert PACKED_MODULES[spec["format"]] is BitStackLinear
    assert spec["n_blocks"] == 3 and spec["order"] == [3, 9]
    assert spec["block_bytes"] == bitstack.block_bytes(24, 40, 4, factors)
    # fp16 factors keep format version 1 (older readers); int8 factors need version 2
    assert (spec["format_version"], spec.get("factor_dtype", "float16")) == ({"float16": 1, "int8": 2}[factors], factors)
    sd = mod.state_dict()
    assert set(sd) == {"weight", "weight.u", "weight.v", "bias"} | ({"weight.scale"} if factors == "int8" else set())
    # a module holding 2 blocks takes the first 2 of a full state dict
    two = BitStackLinear.from_spec(spec, device="cpu", n_loaded=2)
    two.load_state_dict(sd)
    assert torch.equal(two.signs, mod.signs[:2]) and two.n_loaded == 2
    assert torch.equal(two.u, mod.u[:2]) and two.u.dtype == mod.u.dtype
    if factors == "int8":
        assert torch.equal(two.scale, mod.scale[:2])
    assert two.spec()["n_blocks"] == 2 and two.spec()["order"] == [3]
    torch.testing.assert_close(two.dequantized_weight(), bitstack.reconstruct(mod.packed(), 2))


def test_newer_format_version_is_refused():
    from quantkit.errors import FormatError
    spec = {**_mod()[0].spec(), "format_version": 3}
    with pytest.raises(FormatError, match="version 3 is newer"):
        BitStackLinear.from_spec(spec)
    with pytest.raises(FormatError, match="factor_dtype"):
        BitStackLinear.from_spec({**_mod()[0].spec(), "factor_dtype": "int4"})


@FACTORS
def test_dtype_cast_only_touches_bias(factors):
    mod, _ = _mod(factors=factors)
    fdt = mod.u.dtype
    mod = mod.to(torch.bfloat16)
    assert mod.signs.dtype == torch.uint8 and mod.u.dtype == fdt and mod.bias.dtype == torch.bfloat16
    assert mod.scale is None or mod.scale.dtype == torch.float32
    y = mod(torch.randn(2, 40, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
