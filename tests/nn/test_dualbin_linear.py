"""DualBinLinear: forward == reference on its packed data, spec round trip, save/load, inspect."""

import pytest
import torch
from torch import nn

import quantkit
from quantkit.cli import inspect_artifact
from quantkit.errors import FormatError
from quantkit.formats import dualbin
from quantkit.io import artifact
from quantkit.nn import PACKED_MODULES, DualBinLinear
from quantkit.passes.targets import replace_module


def test_registered():
    assert PACKED_MODULES["dualbin"] is DualBinLinear


@pytest.mark.parametrize("k", [64, 100])
def test_forward_matches_dequantized_weight(k):
    torch.manual_seed(0)
    lin = nn.Linear(k, 24, bias=True)
    mod = DualBinLinear.from_linear(lin)
    w = dualbin.dequantize(mod.packed())
    x = torch.randn(3, 5, k)
    torch.testing.assert_close(mod(x), x @ w.T + lin.bias.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(mod.dequantized_weight(), w)


def test_spec_round_trip_and_bad_spec():
    mod = DualBinLinear.from_linear(nn.Linear(128, 8, bias=False))
    spec = mod.spec()
    assert spec["bits_per_weight"] == 2.5 and spec["group"] == 64
    empty = DualBinLinear.from_spec(spec, device="cpu")
    assert empty.weight_plane1.shape == mod.weight_plane1.shape and empty.bias is None
    with pytest.raises(FormatError, match="bad dualbin module spec"):
        DualBinLinear.from_spec({**spec, "group": 48})


def test_dtype_cast_keeps_packed_buffers():
    mod = DualBinLinear.from_linear(nn.Linear(64, 8)).to(torch.bfloat16)
    assert mod.weight_alpha1.dtype == torch.float16 and mod.weight_plane1.dtype == torch.uint8
    assert mod.bias.dtype == torch.bfloat16
    assert mod(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_save_load_inspect(tiny_llama_dir, tmp_path):
    """A model with every decoder Linear FDB-initialised saves, loads to the same logits, and
    inspect reports 2.5 bits/weight for those layers (K is a multiple of 64 in the tiny model)."""
    model = quantkit.load_model(str(tiny_llama_dir))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    for n in names:
        replace_module(model, n, DualBinLinear.from_linear(model.get_submodule(n)))
    out = quantkit.save(model, tmp_path / "db")
    loaded = quantkit.load(out)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    s = inspect_artifact(out)
    assert s["n_packed"] == len(names)
    assert all(r["format"] == "dualbin/w2g64" and r["bits_per_weight"] == 2.5 for r in s["modules"])
    assert s["bits_per_weight_packed"] == 2.5
    assert set(artifact.read_metadata(out)["modules"]) == set(names)
