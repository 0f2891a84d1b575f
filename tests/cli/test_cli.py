"""The command line end to end on a tiny model, and every bad-input path of issue #2."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantkit
from quantkit.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _hash_tree(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _leftovers(parent: Path) -> list:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("recipe", ["nf4", "fp4"])
def test_compress_inspect_eval(tiny_llama_dir, tmp_path, capsys, recipe):
    before = _hash_tree(tiny_llama_dir)
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "compress", str(tiny_llama_dir), "--recipe", str(RECIPES / f"{recipe}.yaml"),
                           "-o", str(out), "--quiet")
    assert code == 0, stdout
    assert "16 packed modules" in stdout  # 14 linears + the int8 embedding + the head tied to it
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert _hash_tree(tiny_llama_dir) == before  # input untouched

    code, stdout, _ = _run(capsys, "inspect", str(out))
    assert code == 0
    assert f"lut4/{recipe}" in stdout and "model.layers.0.self_attn.q_proj" in stdout
    assert "payload bits/weight" in stdout
    assert "intk_embedding" in stdout and "tied_head" in stdout
    code, stdout, _ = _run(capsys, "inspect", str(out), "--json")
    rows = [r for r in json.loads(stdout)["modules"] if r["format"].startswith("lut4/")]
    assert len(rows) == 14
    for r in rows:
        n = r["shape"][0] * r["shape"][1]
        # 4-bit codes + one 8-bit absmax per 64 + one fp32 per 256 blocks (4.127 for large layers)
        assert r["payload_bits_per_weight"] == round(4 + 8 / 64 + 32 * -(-n // (64 * 256)) / n, 4)
        # actual bytes also hold the 16- and 256-entry tables, which matter only for tiny layers
        assert r["bits_per_weight"] == 8 * r["bytes"] / n > r["payload_bits_per_weight"]

    code, stdout, _ = _run(capsys, "eval", str(out), "--seq-len", "64", "--max-tokens", "512", "--quiet")
    assert code == 0 and "perplexity" in stdout


def test_save_load_gives_bit_identical_logits(tiny_llama_dir, tmp_path):
    model = quantkit.compress(str(tiny_llama_dir), "nf4", progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    with torch.no_grad():
        ref = model(ids).logits
    quantkit.save(model, tmp_path / "a")
    loaded = quantkit.load(tmp_path / "a")
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(ref, got)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.lm_head.embedding is loaded.model.embed_tokens  # still tied: the head reads the int8 table


def test_out_exists_is_refused_then_overwritten(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "compress", str(tiny_llama_dir), "--recipe", "nf4", "-o", str(out), "--quiet")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, _ = _run(capsys, "compress", str(tiny_llama_dir), "--recipe", "nf4", "-o", str(out), "--quiet",
                      "--overwrite")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert _leftovers(tmp_path) == []


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("quantkit: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_model_path(tmp_path, capsys):
    code, _, err = _run(capsys, "compress", str(tmp_path / "nope"), "--recipe", "nf4", "-o", str(tmp_path / "o"))
    assert code == 2 and "nope" in _one_line(err)
    assert not (tmp_path / "o").exists()


def test_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("hello")
    code, _, err = _run(capsys, "compress", str(tmp_path / "m"), "--recipe", "nf4", "-o", str(tmp_path / "o"))
    assert code == 2 and "config.json" in _one_line(err)


def test_truncated_safetensors_is_refused_with_its_path(tiny_llama_dir, tmp_path, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    before = _hash_tree(bad)
    code, _, err = _run(capsys, "compress", str(bad), "--recipe", "nf4", "-o", str(tmp_path / "o"), "--quiet")
    assert code == 1 and str(weights) in _one_line(err)
    assert not (tmp_path / "o").exists() and _hash_tree(bad) == before


def test_unknown_recipe_key(tiny_llama_dir, tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("passes:\n  - pass: nf4\n    block_size: 64\n")
    code, _, err = _run(capsys, "compress", str(tiny_llama_dir), "--recipe", str(r), "-o", str(tmp_path / "o"))
    line = _one_line(err)
    assert code == 2 and "block_size" in line and "blocksize" in line
    assert not (tmp_path / "o").exists()


def test_recipe_matching_nothing(tiny_llama_dir, tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("passes:\n  - pass: nf4\n    targets: ['no_such_module']\n")
    code, _, err = _run(capsys, "compress", str(tiny_llama_dir), "--recipe", str(r), "-o", str(tmp_path / "o"),
                        "--quiet")
    assert code == 2 and "matched no module" in _one_line(err)


def test_nan_weights_are_refused_naming_the_tensor(tiny_llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    import shutil
    bad = tmp_path / "nan"
    shutil.copytree(tiny_llama_dir, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = _run(capsys, "compress", str(bad), "--recipe", "nf4", "-o", str(tmp_path / "o"), "--quiet")
    assert code == 1 and "model.layers.1.mlp.up_proj.weight" in _one_line(err)
    assert not (tmp_path / "o").exists()


def test_interrupted_save_leaves_no_output(tiny_llama_dir, tmp_path, monkeypatch):
    from quantkit.io import shards

    model = quantkit.compress(str(tiny_llama_dir), "nf4", progress=False)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "write_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        quantkit.save(model, tmp_path / "o")
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []


def test_debug_shows_traceback(tmp_path, capsys):
    code, _, err = _run(capsys, "compress", str(tmp_path / "nope"), "--recipe", "nf4", "-o", str(tmp_path / "o"),
                        "--debug")
    assert code == 2 and "Traceback" in err


def test_usage_errors_exit_2_via_console_script(tmp_path):
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "compress", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "--recipe" in r.stderr
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "compress", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "smollm2-135m" in r.stdout


def test_newer_artifact_version_is_refused(tiny_llama_dir, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = quantkit.compress(str(tiny_llama_dir), "nf4", progress=False)
    quantkit.save(model, tmp_path / "a")
    path = tmp_path / "a" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["quantkit.format_version"] = "99"
    save_file(tensors, str(path), metadata=meta)
    code, _, err = _run(capsys, "inspect", str(tmp_path / "a"))
    assert code == 1 and "99" in _one_line(err) and "upgrade" in err
