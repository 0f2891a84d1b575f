"""Lut4Linear: forward equals the reference, state dict has bitsandbytes' keys and bytes."""

import pytest
import torch
from torch import nn

from quantkit.formats import lut4
from quantkit.nn import Lut4Linear


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_dequantized_linear(double_quant, bias):
    torch.manual_seed(0)
    lin = nn.Linear(130, 37, bias=bias)
    q = Lut4Linear.from_linear(lin, "nf4", 64, double_quant)
    x = torch.randn(5, 130)
    w = lut4.dequantize(q.packed())
    ref = x @ w.T + (lin.bias if bias else 0)
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(q.dequantized_weight(), w)


def test_input_linear_is_not_modified():
    lin = nn.Linear(64, 8)
    before = lin.weight.detach().clone()
    Lut4Linear.from_linear(lin, "fp4", 64, True)
    assert torch.equal(lin.weight, before)


def test_state_dict_keys_and_bytes_match_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    ours = Lut4Linear.from_linear(lin, "nf4", 64, True).state_dict()
    ref = bnb.nn.Linear4bit(256, 96, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu")  # quantizes on .to()
    theirs = ref.state_dict()
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
    assert torch.equal(ours["weight"], theirs["weight"])
    assert torch.equal(ours["weight.quant_state.bitsandbytes__nf4"], theirs["weight.quant_state.bitsandbytes__nf4"])


def test_state_dict_round_trip_and_mismatch_errors():
    torch.manual_seed(0)
    lin = nn.Linear(70, 9)
    a = Lut4Linear.from_linear(lin, "nf4", 32, True)
    b = Lut4Linear(70, 9, True, a.state)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 70)
    assert torch.equal(a(x), b(x))
    c = Lut4Linear(70, 9, True, lut4.Lut4State("nf4", 64, (9, 70), "float32", True))
    with pytest.raises(RuntimeError, match="does not match module"):
        c.load_state_dict(a.state_dict())


def test_bf16_activations():
    torch.manual_seed(0)
    lin = nn.Linear(128, 16)
    q = Lut4Linear.from_linear(lin, "nf4", 64, True)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16
    ref = (x.float() @ lut4.dequantize(q.packed()).T + lin.bias).to(torch.bfloat16)
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_dtype_cast_keeps_packed_format(cast):
    """model.to(bf16)/.half() must not round the fp32 scales and tables (they are the format)."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 16)
    q = Lut4Linear.from_linear(lin, "nf4", 64, double_quant=False)
    absmax = q.weight_absmax.clone()
    q = q.to(torch.bfloat16) if cast == "bfloat16" else q.half()
    assert q.weight_absmax.dtype == torch.float32 and torch.equal(q.weight_absmax, absmax)
    assert q.weight_quant_map.dtype == torch.float32 and q.weight.dtype == torch.uint8
    assert q.bias.dtype == (torch.bfloat16 if cast == "bfloat16" else torch.float16)
    x = torch.randn(2, 128, dtype=q.bias.dtype)
    assert q(x).dtype == x.dtype
