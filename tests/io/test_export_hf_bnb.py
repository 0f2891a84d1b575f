"""`quantkit.export(..., to="hf-bnb")`: transformers + bitsandbytes load the result on CPU and
give quantkit's logits (issue #7).

Tolerance: max |logits_hf - logits_quantkit| <= 1e-4 * max |logits_quantkit|. Both sides
dequantize the same bytes to the same fp32 weights (bnb's compute dtype is float32) and
accumulate in fp32; only the summation order differs (quantkit's kernel vs bnb's
dequantize + F.linear/BLAS), which moves each dot product by a few ulps of its magnitude,
~1e-7 relative per layer. Measured: 0 on the tiny model, 1e-6 relative on SmolLM2-135M.
bitsandbytes' AVX512-BF16 CPU repack is switched off in these comparisons
(``support_avx512bf16_for_cpu = False``): it re-quantizes the absmax statistics on the
first eval forward (~7e-3 relative logit change), which is bnb's own doing, not the
export's; see docs/export.md.
"""

import json

import pytest
import torch
from safetensors import safe_open

import quantkit
from quantkit.errors import FormatError, UsageError

pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")

REL_TOL = 1e-4


def _recipe(name, passes):
    return {"version": 1, "name": name, "passes": passes}


def _lut4(pass_name="nf4", targets=("re:.*",), blocksize=64, double_quant=True):
    return {"pass": pass_name, "targets": list(targets), "ignore": ["lm_head"], "blocksize": blocksize,
            "double_quant": double_quant}


@pytest.fixture(scope="module")
def artifacts(tiny_llama_dir, tmp_path_factory):
    """name -> artifact folder, built once for this file."""
    root = tmp_path_factory.mktemp("hfbnb-artifacts")
    recipes = {
        "nf4": "nf4",
        "fp4": "fp4",
        "fp4-nodq": _recipe("fp4nodq", [_lut4("fp4", double_quant=False)]),
        "nf4-b128": _recipe("nf4b128", [_lut4("nf4", blocksize=128)]),
        "mlp-only": _recipe("mlp", [_lut4("nf4", targets=["re:.*mlp.*"])]),
        "mixed": _recipe("mixed", [_lut4("nf4", targets=["re:.*self_attn.*"]), _lut4("fp4", targets=["re:.*mlp.*"])]),
    }
    return {k: quantkit.save(quantkit.compress(str(tiny_llama_dir), r, progress=False), root / k)
            for k, r in recipes.items()}


def _load_hf(dest):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dest, device_map="cpu")
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # see the module docstring
    return model.eval()


def _compare(out, dest, packed_names):
    import bitsandbytes as bnb

    ref_model = quantkit.load(out)
    hf = _load_hf(dest)
    for name, m in hf.named_modules():
        if isinstance(m, torch.nn.Linear) or isinstance(m, bnb.nn.Linear4bit):
            assert isinstance(m, bnb.nn.Linear4bit) == (name in packed_names), name
    assert type(hf.lm_head) is torch.nn.Linear
    torch.manual_seed(1)
    ids = torch.randint(0, ref_model.config.vocab_size, (2, 33))
    with torch.no_grad():
        ref = ref_model(ids).logits
        got = hf(ids).logits
    diff = (got - ref).abs().max().item()
    assert diff <= REL_TOL * ref.abs().max().item(), diff
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    return diff


@pytest.mark.parametrize("name", ["nf4", "fp4", "fp4-nodq", "mlp-only"])
def test_transformers_loads_export_and_matches_logits(artifacts, tmp_path, name):
    out = artifacts[name]
    modules = quantkit.io.artifact.read_metadata(out)["modules"]
    dest = quantkit.export(out, to="hf-bnb", dest=tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in dest.iterdir()}
    qc = json.loads((dest / "config.json").read_text())["quantization_config"]
    spec = next(s for s in modules.values() if s["format"] == "lut4")  # the embeddings pass's tables are not bnb
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] is True
    assert qc["bnb_4bit_quant_type"] == spec["quant_type"]
    assert qc["bnb_4bit_use_double_quant"] is spec["double_quant"]
    assert qc["bnb_4bit_compute_dtype"] == "float32"
    if name == "mlp-only":  # every Linear the recipe left alone is listed, so bnb leaves it alone too
        assert set(qc["llm_int8_skip_modules"]) == {"lm_head"} | {
            f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}
    else:
        assert qc["llm_int8_skip_modules"] == ["lm_head"]
    with safe_open(dest / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}  # quantkit's own header keys are dropped
    _compare(out, dest, {n for n, s in modules.items() if s["format"] == "lut4"})  # the tables are written dense


def test_quantization_config_is_what_transformers_writes(tiny_llama_dir, artifacts, tmp_path):
    """Load the source model quantized by transformers+bnb, save_pretrained it: same config.json,
    same tensor keys, dtypes and shapes as our export."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"])
    real = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=bnb_cfg, device_map="cpu")
    real.save_pretrained(tmp_path / "real")  # before any forward (no CPU repack)
    dest = quantkit.export(artifacts["nf4"], to="hf-bnb", dest=tmp_path / "ours")
    theirs = json.loads((tmp_path / "real" / "config.json").read_text())
    ours = json.loads((dest / "config.json").read_text())
    assert ours["quantization_config"] == theirs["quantization_config"]
    assert list(ours["quantization_config"]) == list(theirs["quantization_config"])  # key order too
    assert ours == theirs
    real_st, ours_st = tmp_path / "real" / "model.safetensors", dest / "model.safetensors"
    with safe_open(real_st, "pt") as a, safe_open(ours_st, "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            ta, tb = a.get_slice(k), b.get_slice(k)
            assert (ta.get_dtype(), ta.get_shape()) == (tb.get_dtype(), tb.get_shape()), k
        assert a.metadata() == b.metadata()


def test_blocks_spanning_rows_warn_but_export_exactly(artifacts, tmp_path):
    """bnb 0.50's native CPU dequantize is wrong when blocks span rows (K=64, block 128): we warn,
    and the exported tensors are still the artifact's, byte for byte."""
    from safetensors.torch import load_file

    from quantkit.io.hf_bnb import BnbCpuLayoutWarning

    with pytest.warns(BnbCpuLayoutWarning, match="span rows"):
        dest = quantkit.export(artifacts["nf4-b128"], to="hf-bnb", dest=tmp_path / "hf")
    ours, src = load_file(dest / "model.safetensors"), load_file(artifacts["nf4-b128"] / "model.safetensors")
    assert ours.keys() == src.keys() and all(torch.equal(ours[k], src[k]) for k in src)


def test_mixed_settings_refused(artifacts, tmp_path):
    dest = tmp_path / "hf"
    with pytest.raises(FormatError, match=r"one quantization setting.*self_attn.*mlp.*quant_type 'nf4' vs 'fp4'"):
        quantkit.export(artifacts["mixed"], to="hf-bnb", dest=dest)
    assert not dest.exists() and not list(tmp_path.iterdir())


def test_dest_exists_refused_then_overwrite(artifacts, tmp_path):
    dest = tmp_path / "hf"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="already exists.*overwrite"):
        quantkit.export(artifacts["nf4"], to="hf-bnb", dest=dest)
    assert (dest / "keep.txt").exists()
    quantkit.export(artifacts["nf4"], to="hf-bnb", dest=dest, overwrite=True)
    assert not (dest / "keep.txt").exists() and (dest / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no .partial / .old leftovers


def test_failure_leaves_no_half_written_dest(artifacts, tmp_path, monkeypatch):
    from quantkit.io import shards

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(shards, "write_safetensors", boom)
    dest = tmp_path / "hf"
    with pytest.raises(OSError, match="disk full"):
        quantkit.export(artifacts["nf4"], to="hf-bnb", dest=dest)
    assert list(tmp_path.iterdir()) == []
    # and an existing DEST survives a failed --overwrite untouched
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(OSError):
        quantkit.export(artifacts["nf4"], to="hf-bnb", dest=dest, overwrite=True)
    assert [p.name for p in dest.iterdir()] == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_unknown_target_lists_valid_ones(artifacts, tmp_path):
    with pytest.raises(UsageError, match="unknown export target 'tflite'; valid targets: hf-bnb, onnx"):
        quantkit.export(artifacts["nf4"], to="tflite", dest=tmp_path / "x")
    with pytest.raises(UsageError, match="does not exist"):
        quantkit.export(tmp_path / "missing", to="hf-bnb", dest=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unsupported_format_names_module_type_and_supported(artifacts, tmp_path, monkeypatch):
    from quantkit.export import check_exportable
    from quantkit.io import hf_bnb

    # a format bitsandbytes cannot express (the DB-LLM dual-binary layer), and one quantkit does not know
    with pytest.raises(UsageError, match=r"cannot export module model.layers.0.mlp.up_proj \(DualBinLinear, "
                                         r"format dualbin\) to hf-bnb: hf-bnb supports only lut4 \(nf4/fp4"):
        check_exportable({"model.layers.0.mlp.up_proj": {"format": "dualbin"}}, "hf-bnb")
    with pytest.raises(UsageError, match=r"\(unknown module type, format nosuch\) to hf-bnb"):
        check_exportable({"m": {"format": "nosuch"}}, "hf-bnb")
    # the real artifact, with lut4 taken out of the table: the error names the module's class
    monkeypatch.setattr(hf_bnb, "HF_BNB_FORMATS", {"int4": ("int4 as something", None)})
    with pytest.raises(UsageError, match=r"cannot export module model\.layers\.0\.\S+ \(Lut4Linear, format lut4/nf4\) "
                                         r"\(and 13 more module\(s\)\) to hf-bnb: hf-bnb supports only int4"):
        quantkit.export(artifacts["nf4"], to="hf-bnb", dest=tmp_path / "x")
    assert not (tmp_path / "x").exists()
