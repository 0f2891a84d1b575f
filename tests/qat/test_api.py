"""quantkit.qat.prepare / step / convert on a tiny Llama: phases, recipes, freezing, save/load,
the CLI path, and (quality) QAT beating round-to-nearest."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import quantkit
import quantkit.qat as qat
from quantkit.cli import main
from quantkit.errors import RecipeError, UsageError
from quantkit.nn import IntKLinear, Lut4Linear
from quantkit.qat import QATLinear
from quantkit.recipe import load_recipe, shipped_recipes_dir

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir)


def _ids(model, n=2, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, t), generator=g)


@pytest.mark.parametrize("name,grid,bits", [("qat-int4", "lsq", 4), ("qat-nf4", "nf4", 4), ("qat-w2", "seq", 2)])
def test_shipped_qat_recipes(name, grid, bits):
    r = load_recipe(shipped_recipes_dir() / f"{name}.yaml")
    assert [p.name for p in r.passes] == ["qat"]
    cfg = r.passes[0].config
    assert cfg.grid == grid and cfg.bits == bits and cfg.ignore == ("lm_head",)
    assert load_recipe(name) == r


def test_prepare_step_convert_phases(tiny):
    plan = qat.plan(n_params=10**6, total_tokens=10**4, bits=4, total_steps=100, qat_fraction=0.3)
    ids = _ids(tiny)
    with torch.no_grad():
        ref = tiny(ids).logits
    model = qat.prepare(tiny, "qat-int4", plan=plan)
    mods = qat.qat_modules(model)
    assert len(mods) == 14 and all(m.start == 70 and m.end is None for m in mods.values())
    assert isinstance(model.lm_head, nn.Linear)  # ignored
    assert qat.step(model, 69) is False
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # full precision before the start
    assert qat.step(model, 70) is True
    assert all(bool(m.quantizer.initialized) for m in mods.values())
    with torch.no_grad():
        fake = model(ids).logits
    assert not torch.equal(fake, ref)
    qat.convert(model)
    assert not qat.qat_modules(model)
    assert isinstance(model.model.layers[0].mlp.up_proj, IntKLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fake, rtol=1e-4, atol=1e-4)


def test_start_as_fraction_step_and_plan(tiny):
    def starts(recipe_start, **kw):
        m = qat.prepare(copy.deepcopy(tiny), {"passes": [{"pass": "qat", "bits": 3, "start": recipe_start}]}, **kw)
        return {x.start for x in qat.qat_modules(m).values()}

    assert starts(0.25, total_steps=200) == {50}
    assert starts(17) == {17}
    plan = qat.plan(n_params=10**6, total_tokens=10**5, bits=3, total_steps=40, qat_fraction=0.5)
    assert starts("plan", plan=plan) == {20}
    assert starts(0.75, plan=plan) == {30}
    assert starts("plan") == {20}  # the most recent plan() of this process
    assert starts(0.5) == {20}
    import quantkit.qat.schedule as sched

    sched._LAST_PLAN = None
    with pytest.raises(UsageError, match="needs a plan"):
        starts("plan")
    with pytest.raises(UsageError, match="fraction of the run"):
        starts(0.5)


@pytest.mark.parametrize("bad,match", [
    (dict(start=1.5), "fraction must lie in"), (dict(start=-3), ">= 0"), (dict(start="now"), "plan"),
    (dict(end="plan"), "'end' must be"), (dict(bits=9), "1..8"), (dict(quantizer="seq", bits=3), "takes bits 2"),
    (dict(quantizer="nf4", bits=2), "takes bits 4"), (dict(quantizer="int"), "quantizer"),
    (dict(start=True), "'start' must be"),
])
def test_recipe_validation(bad, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe({"passes": [{"pass": "qat", **bad}]})


def test_prepare_rejects_ptq_recipes_and_empty_matches(tiny):
    with pytest.raises(UsageError, match="'qat' passes only"):
        qat.prepare(tiny, "nf4")
    with pytest.raises(UsageError, match="matched no"):
        qat.prepare(tiny, {"passes": [{"pass": "qat", "start": 0, "targets": ["nothing"]}]})
    with pytest.raises(UsageError, match="prepare first"):
        qat.step(nn.Sequential(nn.Linear(2, 2)), 0)
    with pytest.raises(UsageError, match="must come after start"):
        qat.prepare(tiny, {"passes": [{"pass": "qat", "start": 10, "end": 5}]})


def test_end_freezes_the_quantized_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    qat.prepare(model, {"passes": [{"pass": "qat", "bits": 4, "start": 0, "end": 3, "ignore": []}]})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(4, 16)
    for s in range(6):
        qat.step(model, s)
        if s == 3:
            frozen = model[0].quantized_weight().clone()
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    assert int(model[0].phase) == 2
    assert torch.equal(model[0].quantized_weight(), frozen)  # W kept moving (grads flow?) but Ŵ did not
    sd = model.state_dict()
    fresh = nn.Sequential(nn.Linear(16, 8))
    qat.prepare(fresh, {"passes": [{"pass": "qat", "bits": 4, "start": 0, "end": 3, "ignore": []}]})
    fresh.load_state_dict(sd)  # a checkpoint taken after `end` resumes with its snapshot
    assert torch.equal(fresh[0].quantized_weight(), frozen)
    qat.convert(model)
    assert torch.equal(model[0].dequantized_weight(), frozen)


def test_convert_without_training_is_round_to_nearest_and_nf4_matches_ptq(tiny):
    nf4 = quantkit.compress(tiny, "nf4", progress=False)
    model = qat.prepare(copy.deepcopy(tiny), {"passes": [{"pass": "qat", "quantizer": "nf4", "start": 0}]})
    qat.convert(model)  # QAT never started: quantizers initialised at convert
    assert isinstance(model.model.layers[1].self_attn.o_proj, Lut4Linear)
    for (n1, m1), (n2, m2) in zip(nf4.named_modules(), model.named_modules()):
        assert n1 == n2
        if isinstance(m1, Lut4Linear):
            assert torch.equal(m1.weight, m2.weight) and torch.equal(m1.weight_absmax, m2.weight_absmax)


def test_converted_model_saves_and_loads(tiny, tmp_path):
    plan = qat.plan(n_params=10**6, total_tokens=10**4, bits=2, total_steps=10, qat_fraction=0.5)
    model = qat.prepare(tiny, "qat-w2", plan=plan)
    opt = torch.optim.AdamW(qat.param_groups(model, 0.1), lr=1e-3)
    ids = _ids(model, t=16)
    for s in range(plan.total_steps):
        qat.step(model, s)
        for g in opt.param_groups:
            g["lr"] = plan.lr(s)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    qat.convert(model)
    with torch.no_grad():
        ref = model(ids).logits
    quantkit.save(model, tmp_path / "a")
    loaded = quantkit.load(tmp_path / "a")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, IntKLinear)
    assert loaded.model.layers[0].self_attn.q_proj.state.grid == "seq"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    assert loaded._quantkit_recipe_dict["name"] == "qat-w2"


def test_cli_compress_with_a_qat_recipe_is_rtn(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["compress", str(tiny_llama_dir), "--recipe", str(RECIPES / "qat-int4.yaml"), "-o", str(out), "--quiet"])
    stdout = capsys.readouterr().out
    assert code == 0 and "14 packed modules" in stdout
    loaded = quantkit.load(out)
    lin = loaded.model.layers[0].mlp.down_proj
    assert isinstance(lin, IntKLinear) and lin.state.bits == 4
    code = main(["inspect", str(out)])
    assert code == 0 and "intk" in capsys.readouterr().out


def test_param_groups_keep_decay_off_scales(tiny):
    model = qat.prepare(tiny, {"passes": [{"pass": "qat", "start": 0}]})
    decay, no_decay = qat.param_groups(model, 0.1)
    no_ids = {id(p) for p in no_decay["params"]}
    assert all(id(m.quantizer.alpha) in no_ids for m in qat.qat_modules(model).values())
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1


def test_qat_beats_round_to_nearest_at_2_bits(tiny_llama_dir):
    """Quality: a short 2-bit QAT fine-tune of the tiny model lowers the quantized loss below RTN."""
    from transformers import AutoModelForCausalLM

    from quantkit.models.text import default_text
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = torch.tensor(tok(default_text("calib")[:20000])["input_ids"])
    train = ids[: (ids.numel() // 65) * 65].view(-1, 65)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)

    def qloss(m):
        with torch.no_grad():
            return m(input_ids=train[:8], labels=train[:8]).loss.item()

    rtn = qat.convert(qat.prepare(copy.deepcopy(base), {"passes": [{"pass": "qat", "bits": 2, "start": 0}]}))
    model = qat.prepare(copy.deepcopy(base), {"passes": [{"pass": "qat", "bits": 2, "start": 0}]})
    opt = torch.optim.AdamW(qat.param_groups(model, 0.0), lr=3e-3)
    for s in range(40):
        qat.step(model, s)
        batch = train[8 + (s * 8) % (train.shape[0] - 16):][:8]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    qat.convert(model)
    assert qloss(model) < qloss(rtn) - 0.05


def test_the_issue_snippet_as_written(tiny):
    """plan -> prepare(model, recipe) -> step / lr -> convert, exactly the README's lines."""
    N, D = sum(p.numel() for p in tiny.parameters()), 40 * 2 * 16
    plan = quantkit.qat.plan(n_params=N, total_tokens=D, bits=4, tokens_per_step=2 * 16, qat_fraction=0.25)
    model = quantkit.qat.prepare(tiny, RECIPES / "qat-int4.yaml")
    assert {m.start for m in qat.qat_modules(model).values()} == {plan.qat_start} == {30}
    opt = torch.optim.AdamW(qat.param_groups(model, 0.0), lr=1e-3)
    ids = _ids(model, t=16)
    seen = []
    for step in range(plan.total_steps):
        for g in opt.param_groups:
            g["lr"] = plan.lr(step)
        seen.append(quantkit.qat.step(model, step))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert seen == [s >= 30 for s in range(40)]
    model = quantkit.qat.convert(model)
    assert isinstance(model.model.layers[0].self_attn.k_proj, IntKLinear)
