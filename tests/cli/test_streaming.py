"""Streaming compress (issue #8): block-by-block output equals the in-memory path byte for
byte, sharded artifacts read everywhere, and interrupted runs resume to identical bytes."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import quantkit
from quantkit.cli import main
from quantkit.io import artifact
from quantkit.streaming import DELAY_ENV, JOURNAL, partial_dir

ROOT = Path(__file__).resolve().parents[2]


def _hash_tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _in_memory(src, recipe, out, **save_kw):
    model = quantkit.compress(str(src), recipe, progress=False)
    quantkit.save(model, out, **save_kw)
    return model


@pytest.fixture(scope="module")
def untied_sharded_dir(tmp_path_factory):
    """A 3-layer Llama with biases and untied head, saved in bf16 as 4+ safetensors shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("untied-sharded")
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, attention_bias=True,
                      max_position_embeddings=128, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def test_streaming_bytes_equal_in_memory_path(tiny_llama_dir, tmp_path, capsys):
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "nf4", "-o", tmp_path / "s", "--quiet")
    assert code == 0, err
    model = _in_memory(tiny_llama_dir, "nf4", tmp_path / "m")
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    with torch.no_grad():
        assert torch.equal(quantkit.load(tmp_path / "s")(ids).logits, model(ids).logits)
    assert not partial_dir(tmp_path / "s").exists()


def test_streaming_sharded_bf16_untied_source(untied_sharded_dir, tmp_path, capsys):
    code, _, err = _run(capsys, "compress", untied_sharded_dir, "--recipe", "fp4", "-o", tmp_path / "s", "--quiet")
    assert code == 0, err
    _in_memory(untied_sharded_dir, "fp4", tmp_path / "m")
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()


def test_recipe_that_unties_the_head(tiny_llama_dir, tmp_path, capsys):
    """Quantizing lm_head breaks the tie with the embedding: both paths store both."""
    r = tmp_path / "all.yaml"
    r.write_text("passes:\n  - pass: nf4\n    targets: ['re:.*']\n    ignore: []\n")
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", r, "-o", tmp_path / "s", "--quiet")
    assert code == 0, err
    _in_memory(tiny_llama_dir, r, tmp_path / "m")
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()
    assert "lm_head" in artifact.read_metadata(tmp_path / "s")["modules"]


def test_sharded_output_reads_everywhere(tiny_llama_dir, tmp_path, capsys):
    code, stdout, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "nf4", "-o", tmp_path / "s",
                             "--max-shard-size", "30KB", "--quiet")
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    shard_files = [f for f in files if f.startswith("model-")]
    assert len(shard_files) > 2
    info = artifact.read_metadata(tmp_path / "s")
    # 14 linears + the int8 embedding + the head tied to it
    assert len(info["modules"]) == 16 and [f.name for f in info["files"]] == shard_files
    from quantkit.io.safetensors_check import validate_safetensors
    for f in info["files"]:  # every shard carries the same quantkit metadata
        assert validate_safetensors(f)["__metadata__"] == info["metadata"]
    # the in-memory path shards the same way, to the same bytes
    model = _in_memory(tiny_llama_dir, "nf4", tmp_path / "m", max_shard_bytes=30_000)
    assert _hash_tree(tmp_path / "m") == _hash_tree(tmp_path / "s")
    ids = torch.randint(0, 300, (1, 23))
    with torch.no_grad():
        assert torch.equal(quantkit.load(tmp_path / "s")(ids).logits, model(ids).logits)
    code, stdout, _ = _run(capsys, "inspect", tmp_path / "s", "--json")
    assert code == 0 and json.loads(stdout)["n_packed"] == 16  # 14 linears, the int8 embedding, the tied head


def test_hf_bnb_export_of_sharded_artifact(tiny_llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    _run(capsys, "compress", tiny_llama_dir, "--recipe", "nf4", "-o", tmp_path / "s", "--max-shard-size", "30KB",
         "--quiet")
    _run(capsys, "compress", tiny_llama_dir, "--recipe", "nf4", "-o", tmp_path / "one", "--quiet")
    quantkit.export(tmp_path / "s", to="hf-bnb", dest=tmp_path / "hf")
    quantkit.export(tmp_path / "one", to="hf-bnb", dest=tmp_path / "hf1")
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert not any(n.startswith("model-") for n in names)  # small: one file, no stale shards copied
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "hf1" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_onnx_export_of_sharded_artifact(tiny_llama_dir, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    _run(capsys, "compress", tiny_llama_dir, "--recipe", "nf4", "-o", tmp_path / "s", "--max-shard-size", "30KB",
         "--quiet")
    quantkit.export(tmp_path / "s", to="onnx", dest=tmp_path / "x")
    names = {p.name for p in (tmp_path / "x").iterdir()}
    assert "model.onnx" in names and not any(n.endswith(".safetensors") or n.endswith(".index.json") for n in names)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        ref = quantkit.load(tmp_path / "s")(ids).logits.numpy()
    sess = ort.InferenceSession(str(tmp_path / "x" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input_ids": ids.numpy()})[0]
    assert float(np.abs(got - ref).max()) <= 1e-4 * float(np.abs(ref).max())


def test_progress_lines_when_not_a_tty(tiny_llama_dir, tmp_path, capsys):
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "nf4", "-o", tmp_path / "a")
    assert code == 0
    assert "[1/5] model.embed_tokens done" in err and "[5/5] lm_head done" in err and "ETA" in err
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "nf4", "-o", tmp_path / "b", "--quiet")
    assert code == 0 and err == ""


def test_scope_selects_the_same_modules(tiny_llama_dir):
    from quantkit.passes.targets import select_linears

    model = quantkit.load_model(tiny_llama_dir)
    whole = [n for n, _ in select_linears(model, ("re:.*",), ("lm_head", "k_proj"))]
    scoped = [n for s in ("model.layers.0", "model.layers.1", "lm_head")
              for n, _ in select_linears(model, ("re:.*",), ("lm_head", "k_proj"), scope=s)]
    assert whole == scoped and "model.layers.1.mlp.up_proj" in scoped
    assert [n for n, _ in select_linears(model, ("re:.*",), (), scope="lm_head")] == ["lm_head"]


# ----------------------------------------------------------------------------- interruption and resume

def _spawn(src, out, *extra, delay="0.6"):
    env = dict(os.environ, **{DELAY_ENV: delay, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    cmd = [sys.executable, "-m", "quantkit.cli", "compress", str(src), "--recipe", "nf4", "-o", str(out), *extra]
    # SIGINT back to its default in the child: a test run started in the background (`cmd &`,
    # nohup) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_units(out, n, proc, timeout=120):
    journal = partial_dir(out) / JOURNAL
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"compress ended early: {proc.returncode} {proc.stderr.read()}")
        try:
            if len(json.loads(journal.read_text())["done"]) >= n:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError("compress made no progress")


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(["compress", str(tiny_llama_dir), "--recipe", "nf4", "-o", str(out), "--quiet"]) == 0
    return _hash_tree(out)


def test_kill_9_then_resume_is_byte_identical(tiny_llama_dir, tmp_path, reference, capsys):
    src_before = _hash_tree(tiny_llama_dir)
    out = tmp_path / "out"
    proc = _spawn(tiny_llama_dir, out)
    _wait_for_units(out, 2, proc)
    proc.kill()  # SIGKILL: no clean-up at all
    proc.wait()
    assert not out.exists()  # never an OUT that looks complete
    assert partial_dir(out).is_dir()
    # a damaged unit file is detected and redone
    unit0 = partial_dir(out) / "units" / "00000.safetensors"
    data = bytearray(unit0.read_bytes())
    data[-1] ^= 0xFF
    unit0.write_bytes(bytes(data))
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "nf4", "-o", out, "--resume")
    assert code == 0, err
    assert "resuming" in err and "damaged" in err
    assert _hash_tree(out) == reference
    assert not partial_dir(out).exists() and _hash_tree(tiny_llama_dir) == src_before


def test_sigint_exits_130_and_resumes(tiny_llama_dir, tmp_path, reference, capsys):
    out = tmp_path / "out"
    # 2 s per block leaves 6 s between the journal showing 2 blocks and the end of the run,
    # so the signal lands mid-run even when a loaded CI machine deschedules this test
    proc = _spawn(tiny_llama_dir, out, delay="2.0")
    _wait_for_units(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    assert not out.exists() and partial_dir(out).is_dir()
    # resuming with another recipe is refused, naming the reason; the partial folder stays
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "fp4", "-o", out, "--resume")
    assert code == 2 and "different recipe" in err and not out.exists() and partial_dir(out).is_dir()
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "nf4", "-o", out, "--resume", "--quiet")
    assert code == 0, err
    assert _hash_tree(out) == reference


def test_sigterm_exits_143_without_output(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    proc = _spawn(tiny_llama_dir, out, delay="2.0")
    _wait_for_units(out, 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert not out.exists()
    # without --resume an earlier partial folder is discarded and the run starts over
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "nf4", "-o", out)
    assert code == 0 and "discarding" in err and "[1/5]" in err
