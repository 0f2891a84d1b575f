"""BitStack's perplexity ranking (quantkit/passes/bitstack_ranking.py) on the tiny Llama:
the suffix replay gives the full forward's NLL from any layer, the same order as full
forwards, and falls back to full forwards when the replay disagrees."""

import pytest
import torch

import quantkit
from quantkit.calibration import CalibSource
from quantkit.models.text import default_text
from quantkit.nn import BitStackLinear
from quantkit.passes import bitstack_ranking as R
from quantkit.progress import stage


@pytest.fixture(scope="module")
def stacked(tiny_llama_dir):
    """The tiny Llama with every linear but the head as 4 BitStack blocks (all loaded)."""
    model = quantkit.load_model(tiny_llama_dir)
    recipe = {"version": 1, "name": "t", "passes": [{"pass": "bitstack", "n_blocks": 4, "rank": 4, "order": "proxy",
                                                        "calib_samples": 4, "calib_seq_len": 64}]}
    model = quantkit.compress(model, recipe, progress=False)
    model.eval()
    return model


def _val(model, rows=2, seq=40):
    return CalibSource(model._quantkit_tokenizer, default_text("eval")).batches(rows, seq, seed=5)


def _mods(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, BitStackLinear)}


def test_replay_from_every_layer_equals_the_full_forward(stacked):
    val = _val(stacked)
    suffix = R.SuffixNLL(stacked, val)
    full = suffix.snapshot()
    assert full == pytest.approx(R.val_nll(stacked, val), rel=1e-6)
    for first in range(len(suffix.layers)):
        assert suffix.nll_from(first) == pytest.approx(full, rel=1e-6), first


def test_replay_sees_a_changed_layer(stacked):
    """After a layer's weights change, replaying from that layer gives the new model's NLL."""
    val = _val(stacked)
    suffix = R.SuffixNLL(stacked, val)
    before = suffix.snapshot()
    layer = len(suffix.layers) - 1
    mlp = suffix.layers[layer].mlp
    saved = mlp.down_proj
    mlp.down_proj = torch.nn.Linear(saved.in_features, saved.out_features, bias=False)
    try:
        after = R.val_nll(stacked, val)
        assert after != pytest.approx(before, rel=1e-4)
        assert suffix.nll_from(layer) == pytest.approx(after, rel=1e-6)
    finally:
        mlp.down_proj = saved


def test_layer_of(stacked):
    suffix = R.SuffixNLL(stacked, _val(stacked))
    assert suffix.layer_of("model.layers.1.mlp.up_proj") == 1
    assert suffix.layer_of("model.layers.0.self_attn.q_proj") == 0
    assert suffix.layer_of("lm_head") is None


def test_replay_order_equals_full_forward_order(stacked):
    val = _val(stacked)
    mods = _mods(stacked)
    fast = R.ppl_order(stacked, mods, val, 2, progress=False, replay=True)
    slow = R.ppl_order(stacked, mods, val, 2, progress=False, replay=False)
    assert fast == slow
    assert sorted(fast) == sorted((n, lvl) for n in mods for lvl in (1, 2))
    assert all(isinstance(stacked.get_submodule(n), BitStackLinear) for n in mods)  # modules put back


def test_replay_that_disagrees_falls_back_to_full_forwards(stacked, monkeypatch):
    val = _val(stacked)
    mods = _mods(stacked)
    slow = R.ppl_order(stacked, mods, val, 1, progress=False, replay=False)
    monkeypatch.setattr(R.SuffixNLL, "nll_from", lambda self, first: 123.0)
    with pytest.warns(UserWarning, match="full forwards"):
        assert R.ppl_order(stacked, mods, val, 1, progress=False, replay=True) == slow


def test_stage_prints_its_duration(capsys, monkeypatch):
    monkeypatch.delenv("QUANTKIT_QUIET", raising=False)
    with stage("bitstack calibration") as s:
        pass
    assert s.seconds >= 0
    assert capsys.readouterr().err.startswith("quantkit: bitstack calibration: 0s")
    with stage("quiet step", enabled=False):
        pass
    monkeypatch.setenv("QUANTKIT_QUIET", "1")
    with stage("quiet step"):
        pass
    assert capsys.readouterr().err == ""
