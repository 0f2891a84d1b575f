"""transformers' from_pretrained / save_pretrained on quantkit artifacts of every format
(quantkit/integrations/transformers_quantizer.py): the model is built onto the packed modules
with the very tensors quantkit.load reads, so logits are bit-identical."""

import json
import os
import subprocess
import sys

import pytest
import torch

import quantkit
from quantkit.nn import PACKED_MODULES


def _qat(bits, quantizer):
    return {"version": 1, "name": f"w{bits}", "passes": [{"pass": "qat", "bits": bits, "quantizer": quantizer,
                                                          "targets": ["re:.*"], "ignore": ["lm_head"]}]}


BITSTACK = {"version": 1, "name": "bs", "passes": [{"pass": "bitstack", "n_blocks": 3, "rank": 4, "calib_samples": 2,
                                                    "calib_seq_len": 32, "val_seq_len": 32, "order": "proxy"}]}
RECIPES = {"nf4": "recipes/nf4.yaml", "fp4": "recipes/fp4.yaml", "int4": _qat(4, "lsq"), "int2": _qat(2, "seq"),
           "bitstack": BITSTACK}


@pytest.fixture(scope="module")
def artifacts(tiny_llama_dir, tmp_path_factory):
    from quantkit.nn import DualBinLinear
    from quantkit.passes.targets import replace_module

    root = tmp_path_factory.mktemp("hf-formats")
    out = {name: quantkit.save(quantkit.compress(quantkit.load_model(tiny_llama_dir), recipe, progress=False),
                               root / name) for name, recipe in RECIPES.items()}
    model = quantkit.load_model(tiny_llama_dir)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            replace_module(model, name, DualBinLinear.from_linear(mod, group=64, init="absmax"))
    out["dualbin"] = quantkit.save(model, root / "dualbin")
    return out


def _ids(vocab):
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _packed_types(model):
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, tuple(PACKED_MODULES.values()))})


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4", "int2", "bitstack", "dualbin"])
def test_from_pretrained_equals_quantkit_load_and_save_pretrained_round_trips(artifacts, tmp_path, fmt):
    from transformers import AutoModelForCausalLM

    out = artifacts[fmt]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "quantkit", "format_version": 1}
    ours = quantkit.load(out)
    theirs = AutoModelForCausalLM.from_pretrained(out)
    assert _packed_types(theirs) == _packed_types(ours) and _packed_types(ours)
    assert not [n for n, t in list(theirs.named_parameters()) + list(theirs.named_buffers()) if t.is_meta]
    ids = _ids(ours.config.vocab_size)
    assert torch.equal(_logits(theirs, ids), _logits(ours, ids))
    assert theirs._quantkit_memory_bytes == ours._quantkit_memory_bytes

    theirs.save_pretrained(tmp_path / "saved")
    again_ours, again_theirs = quantkit.load(tmp_path / "saved"), AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(_logits(again_ours, ids), _logits(ours, ids))
    assert torch.equal(_logits(again_theirs, ids), _logits(ours, ids))
    info = quantkit.io.artifact.read_metadata(tmp_path / "saved")
    assert info["modules"] == quantkit.io.artifact.read_metadata(out)["modules"]


def test_bitstack_memory_budget_from_the_config(artifacts):
    from transformers import AutoConfig, AutoModelForCausalLM

    out = artifacts["bitstack"]
    plan = quantkit.io.artifact.budget_plan(out)
    budget = (plan.minimum + plan.maximum) // 2
    config = AutoConfig.from_pretrained(out)
    config.quantization_config["memory_budget"] = budget
    theirs = AutoModelForCausalLM.from_pretrained(out, config=config)
    ours = quantkit.load(out, memory_budget=budget)
    assert plan.minimum < theirs._quantkit_memory_bytes == ours._quantkit_memory_bytes <= budget < plan.maximum
    loaded = {n: m.n_loaded for n, m in theirs.named_modules() if hasattr(m, "n_loaded")}
    assert loaded == {n: m.n_loaded for n, m in ours.named_modules() if hasattr(m, "n_loaded")}
    assert min(loaded.values()) < 3  # some layer really holds fewer blocks
    ids = _ids(ours.config.vocab_size)
    assert torch.equal(_logits(theirs, ids), _logits(ours, ids))
    config.quantization_config["memory_budget"] = plan.minimum - 1
    with pytest.raises(quantkit.QuantkitError, match="below this artifact's minimum"):
        AutoModelForCausalLM.from_pretrained(out, config=config)


def test_an_unknown_quantization_config_key_is_refused(artifacts, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    bad = tmp_path / "bad"
    shutil.copytree(artifacts["nf4"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["memory_budgt"] = "1MB"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown key 'memory_budgt'; valid keys: quant_method, format_version, "
                                         "memory_budget"):
        AutoModelForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize("order", ["quantkit first", "transformers first"])
def test_registration_follows_either_import_order(artifacts, order):
    """``import quantkit`` does not import transformers; the quantizer is registered the moment
    transformers' registry is imported, or at once if it already was."""
    imports = ["import quantkit", "from transformers import AutoModelForCausalLM"]
    code = "\n".join([*(imports if order == "quantkit first" else imports[::-1]),
                      f"m = AutoModelForCausalLM.from_pretrained({str(artifacts['int4'])!r})",
                      "print(type(m.model.layers[0].mlp.down_proj).__name__)"])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "IntKLinear"
    assert "could not register" not in r.stderr
