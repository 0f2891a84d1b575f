"""Streaming compress of a calibrated pass (issue #8): BitStack runs block by block on
activations carried from block to block, gives the same bytes as the whole-model pass, and
resumes after kill -9 (also when the carried activations were damaged) to the same bytes."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import quantkit
from quantkit.cli import main
from quantkit.models.loading import resolve_model_source
from quantkit.models.streaming import plan_streaming
from quantkit.models.text import default_text
from quantkit.recipe import load_recipe
from quantkit.stream_calibration import CARRY_DIR, refusal
from quantkit.streaming import DELAY_ENV, JOURNAL, partial_dir

ROOT = Path(__file__).resolve().parents[2]

# the shipped recipe's sign choice and factor storage (feedback + one sweep, int8 factors)
BITSTACK = {"pass": "bitstack", "n_blocks": 3, "rank": 4, "svd": "lowrank", "order": "proxy", "error_feedback": True,
            "sign_sweeps": 1, "factor_dtype": "int8", "calib_samples": 3, "calib_seq_len": 48}


def _hash_tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_recipe(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump({"version": 1, "name": "bs-stream", "passes": [dict(BITSTACK, **overrides)]}))
    return path


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    """(recipe path, calibration text path, hashes of the streamed artifact)."""
    d = tmp_path_factory.mktemp("bs-stream")
    recipe = _write_recipe(d / "bs.yaml")
    text = d / "calib.txt"
    text.write_text(default_text("eval")[:40_000], encoding="utf-8")  # not the default excerpt
    out = d / "ref"
    assert main(["compress", str(tiny_llama_dir), "--recipe", str(recipe), "-o", str(out), "--quiet",
                 "--calib-text", str(text)]) == 0
    return recipe, text, out


def test_streamed_equals_whole_model_bytes(tiny_llama_dir, setup, tmp_path, capsys):
    recipe, text, streamed = setup
    whole = quantkit.compress(str(tiny_llama_dir), str(recipe), progress=False,
                              calib_text=text.read_text(encoding="utf-8"))
    quantkit.save(whole, tmp_path / "whole")
    assert (streamed / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert not partial_dir(streamed).exists()
    # the calibration text matters (otherwise the equality above could not fail)
    capsys.readouterr()
    assert main(["compress", str(tiny_llama_dir), "--recipe", str(recipe), "-o", str(tmp_path / "dflt")]) == 0
    assert (tmp_path / "dflt" / "model.safetensors").read_bytes() != (streamed / "model.safetensors").read_bytes()
    _, err = capsys.readouterr()
    assert "block by block" in err and "loading" not in err


def _spawn(src, out, recipe, text, delay="1.5"):
    env = dict(os.environ, **{DELAY_ENV: delay, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    cmd = [sys.executable, "-m", "quantkit.cli", "compress", str(src), "--recipe", str(recipe), "-o", str(out),
           "--calib-text", str(text)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_after_first_block(src, out, recipe, text) -> Path:
    """Run until the journal lists the first decoder block, kill -9; returns its carry file."""
    proc = _spawn(src, out, recipe, text)
    journal = partial_dir(out) / JOURNAL
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        assert proc.poll() is None, proc.stderr.read()
        try:
            done = json.loads(journal.read_text())["done"]
            if any("carry" in e for e in done):
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    else:
        raise AssertionError("compress made no progress")
    proc.kill()
    proc.wait()
    assert not out.exists()
    carry = [e["carry"] for e in done if "carry" in e][-1]
    path = partial_dir(out) / carry["file"]
    assert path.parent.name == CARRY_DIR and path.is_file()
    return path


@pytest.mark.parametrize("damage_carry", [False, True])
def test_kill_9_then_resume_is_byte_identical(tiny_llama_dir, setup, tmp_path, capsys, damage_carry):
    recipe, text, streamed = setup
    out = tmp_path / "out"
    carry = _kill_after_first_block(tiny_llama_dir, out, recipe, text)
    if damage_carry:
        data = bytearray(carry.read_bytes())
        data[-1] ^= 0xFF
        carry.write_bytes(bytes(data))
    code = main(["compress", str(tiny_llama_dir), "--recipe", str(recipe), "-o", str(out), "--resume",
                 "--calib-text", str(text)])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "resuming" in err
    assert ("redoing the decoder blocks" in err) == damage_carry
    assert _hash_tree(out) == _hash_tree(streamed)
    assert not partial_dir(out).exists()


def test_resume_with_other_calibration_text_is_refused(tiny_llama_dir, setup, tmp_path, capsys):
    recipe, text, _ = setup
    out = tmp_path / "out"
    _kill_after_first_block(tiny_llama_dir, out, recipe, text)
    other = tmp_path / "other.txt"
    other.write_text(text.read_text(encoding="utf-8")[::-1], encoding="utf-8")
    code = main(["compress", str(tiny_llama_dir), "--recipe", str(recipe), "-o", str(out), "--resume",
                 "--calib-text", str(other)])
    _, err = capsys.readouterr()
    assert code == 2 and "calibration text" in err
    assert not out.exists() and partial_dir(out).is_dir()


def test_what_cannot_stream_says_why(tiny_llama_dir, tmp_path):
    plan = plan_streaming(resolve_model_source(str(tiny_llama_dir)))
    assert refusal(plan, load_recipe(str(_write_recipe(tmp_path / "a.yaml")))) is None
    assert refusal(plan, load_recipe("nf4")) is None
    ppl = refusal(plan, load_recipe(str(_write_recipe(tmp_path / "b.yaml", order="ppl"))))
    assert "ppl" in ppl and "perplexity" in ppl
    head = refusal(plan, load_recipe(str(_write_recipe(tmp_path / "c.yaml", targets=["lm_head"], ignore=[]))))
    assert "lm_head" in head and "outside the decoder blocks" in head
    dbllm = refusal(plan, load_recipe({"version": 1, "name": "d", "passes": [{"pass": "dbllm", "steps": 0}]}))
    assert "dbllm" in dbllm and "whole model" in dbllm


def test_mha_biases_bf16_shards_streamed_equals_whole_model(tiny_llama_dir, tmp_path):
    """Plain multi-head attention (o_proj's scale folds into v_proj's rows), biases, an untied
    head and a bf16 checkpoint in several shards: the same bytes both ways."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = tmp_path / "mha"
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, attention_bias=True,
                      max_position_embeddings=128, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src, max_shard_size="60KB")
    tok.save_pretrained(src)
    recipe = _write_recipe(tmp_path / "bs.yaml")
    assert main(["compress", str(src), "--recipe", str(recipe), "-o", str(tmp_path / "s"), "--quiet"]) == 0
    whole = quantkit.compress(str(src), str(recipe), progress=False)
    quantkit.save(whole, tmp_path / "m")
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()


_BOTH_WAYS = """
import sys
import quantkit
from quantkit.cli import main
src, recipe, text, out = sys.argv[1:5]
assert main(["compress", src, "--recipe", recipe, "-o", out + "/s", "--quiet", "--calib-text", text]) == 0
whole = quantkit.compress(src, recipe, progress=False, calib_text=open(text, encoding="utf-8").read())
quantkit.save(whole, out + "/m")
"""


@pytest.mark.parametrize("env", [{"QUANTKIT_CPU_ISA": "avx2"}, {"QUANTKIT_CPU_ISA": "scalar"},
                                 {"QUANTKIT_KERNEL": "torch"}], ids=["avx2", "scalar", "torch-reference"])
def test_streamed_equals_whole_model_on_every_kernel_path(tiny_llama_dir, setup, tmp_path, env):
    """Both passes run the same shapes through the same kernels, so whichever kernel path a
    CPU takes (AVX-512 / AVX2 / scalar, or the pure-torch reference) they agree byte for byte."""
    recipe, text, _ = setup
    run_env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), **env)
    proc = subprocess.run([sys.executable, "-c", _BOTH_WAYS, str(tiny_llama_dir), str(recipe), str(text),
                           str(tmp_path)], env=run_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()
