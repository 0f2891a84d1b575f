"""The dbllm pass on a tiny Llama: FDB training pieces, distillation losses, NaN stop, CLI."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import quantkit
from quantkit.calibration import calib_source
from quantkit.cli import main
from quantkit.errors import RecipeError
from quantkit.formats import dualbin
from quantkit.nn import DualBinLinear
from quantkit.passes import dbllm, fdb_train
from quantkit.passes.fdb_train import FDBTrainLinear, distill_loss, nearest_bits, nearest_bits_ordered

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "dbllm-w2g64.yaml"


def _recipe(tmp_path, **overrides):
    """The shipped recipe with small-budget overrides, as a file (so the CLI can read it)."""
    data = yaml.safe_load(RECIPE.read_text())
    # the distillation alone: the block stage and feedback init are tested in test_dbllm_blocks.py
    data["passes"][0].update(dict(batch_size=2, seq_len=16, n_samples=8, warmup=1, bf16=False, block_steps=0,
                                  feedback=False, default_calib_text="calib"), **overrides)
    path = tmp_path / "dbllm.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_nearest_bits_fast_path_agrees():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4, 64, generator=g)
    s = dualbin.init_step(w.reshape(16, -1), 64, "mse")       # both signs of s occur
    a1, a2 = (2 * s).unsqueeze(-1), (-s).unsqueeze(-1)
    for got, want in zip(nearest_bits_ordered(w, a1, a2), nearest_bits(w, a1, a2)):
        assert torch.equal(got, want)
    a2_bad = a2 * 3                                           # levels out of FDB order -> fallback
    for got, want in zip(nearest_bits_ordered(w, a1, a2_bad), nearest_bits(w, a1, a2_bad)):
        assert torch.equal(got, want)


def test_fdb_linear_init_equals_format_init_and_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(100, 8)
    m = FDBTrainLinear(lin, 64, "mse")
    q = m.pack()
    ref = dualbin.quantize(lin.weight.data, 64, "mse")
    assert torch.equal(q.plane1, ref.plane1) and torch.equal(q.plane2, ref.plane2)
    assert torch.equal(q.alpha1, ref.alpha1) and torch.equal(q.alpha2, ref.alpha2)
    torch.testing.assert_close(m.quantized_weight(), dualbin.dequantize(ref))
    # gradients: dW = dW_hat (identity STE); d alpha1 = sum over the group of dW_hat * b1
    gw = torch.randn(8, 100)
    (m.quantized_weight() * gw).sum().backward()
    assert torch.equal(m.weight.grad, gw)
    b1 = dualbin.unpack_bits(ref.plane1, 128)[:, :100].float()
    want = torch.stack([(gw * b1)[:, :64].sum(1), (gw * b1)[:, 64:].sum(1)], 1)
    torch.testing.assert_close(m.alpha1.grad, want)


def test_distill_losses():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    kd, stats = distill_loss(s, t, "uniform")
    kl = torch.nn.functional.kl_div(torch.log_softmax(s, -1).reshape(-1, 11), torch.log_softmax(t, -1).reshape(-1, 11),
                                    log_target=True, reduction="batchmean")
    torch.testing.assert_close(kd, kl)
    assert stats["kl"] == pytest.approx(kl.item(), rel=1e-5)
    same, _ = distill_loss(t, t, "mean_entropy")
    assert same.abs() < 1e-6
    # the weighted loss is a convex combination of per-token KLs: between their min and max
    dad, _ = distill_loss(s, t, "mean_entropy", gamma=2.0)
    pt = torch.softmax(t, -1)
    per_tok = (pt * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
    assert per_tok.min() <= dad <= per_tok.max() and not torch.isclose(dad, kd)
    assert set(fdb_train.DAD_WEIGHTS) >= {"uniform", "mean_entropy", "entropy_gap"}


def test_config_validation(tmp_path):
    with pytest.raises(RecipeError, match="dad_weight"):
        quantkit.recipe.load_recipe(_recipe(tmp_path, dad_weight="papers"))
    with pytest.raises(RecipeError, match="group"):
        quantkit.recipe.load_recipe(_recipe(tmp_path, group=48))
    with pytest.raises(RecipeError, match="unknown key 'stpes'"):
        quantkit.recipe.load_recipe(_recipe(tmp_path, stpes=3))


def _kl_on(model, teacher, ids):
    with torch.no_grad():
        return distill_loss(model(ids).logits, teacher(ids).logits)[1]["kl"]


@pytest.mark.parametrize("loss", ["kd", "dad"])
def test_training_reduces_kl(tiny_llama_dir, tmp_path, loss):
    """Distilling on two fixed sequences must cut the student's KL to the teacher on them
    well below the FDB init's (the tiny random model's KL is small in absolute terms)."""
    teacher = quantkit.load_model(str(tiny_llama_dir))
    calib = calib_source(teacher)
    ids = calib.batches(2, 16, seed=0)
    kl = {}
    for steps in (0, 15):  # 0 = FDB init only
        model = quantkit.load_model(str(tiny_llama_dir))
        history = []
        cfg = quantkit.recipe.load_recipe(_recipe(tmp_path, steps=steps, loss=loss, n_samples=2, lr=1e-4,
                                                  lr_alpha=1e-3)).passes[0].config
        names = dbllm.apply(model, cfg, progress=False, calib=calib, history=history)
        assert len(names) == 14 and all(isinstance(model.get_submodule(n), DualBinLinear) for n in names)
        assert len(history) == steps and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
        kl[steps] = _kl_on(model, teacher, ids)
    assert kl[15] < 0.5 * kl[0], kl


def test_sampled_data_option(tiny_llama_dir, tmp_path):
    model = quantkit.load_model(str(tiny_llama_dir))
    cfg = quantkit.recipe.load_recipe(_recipe(tmp_path, steps=1, data="sampled")).passes[0].config
    teacher = quantkit.load_model(str(tiny_llama_dir))
    ids = dbllm._training_data(teacher, cfg, calib_source(model), torch.device("cpu"))
    assert ids.shape == (8, 16)
    text_ids = calib_source(model).batches(8, 16, seed=0)
    assert torch.equal(ids[:, 0], text_ids[:, 0]) and not torch.equal(ids, text_ids)


def test_nan_loss_stops_and_writes_nothing(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    real = fdb_train.distill_loss
    calls = []

    def poisoned(*a, **k):
        loss, stats = real(*a, **k)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), stats

    monkeypatch.setattr(dbllm, "distill_loss", poisoned)
    out = tmp_path / "out"
    code = main(["compress", str(tiny_llama_dir), "--recipe", str(_recipe(tmp_path, steps=5)), "-o", str(out),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "loss is nan at step 3/5" in err and err.count("\n") == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # in memory, the model keeps the last good state, packed
    model = quantkit.load_model(str(tiny_llama_dir))
    calls.clear()
    cfg = quantkit.recipe.load_recipe(_recipe(tmp_path, steps=5)).passes[0].config
    with pytest.raises(dbllm.TrainingDiverged):
        dbllm.apply(model, cfg, progress=False, calib=calib_source(model))
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), DualBinLinear)


def test_cli_compress_load_inspect(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compress", str(tiny_llama_dir), "--recipe", str(_recipe(tmp_path, steps=2)), "-o", str(out),
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["n_packed"] == 14 and s["bits_per_weight_packed"] == 2.5
    model = quantkit.load(out)
    assert isinstance(model.get_submodule("model.layers.1.self_attn.o_proj"), DualBinLinear)
    assert torch.isfinite(model(torch.randint(0, 100, (1, 8))).logits).all()
