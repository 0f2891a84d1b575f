"""Bad input to the streaming compress (issue #8): one clear line each, input untouched,
no OUT and no partial folder left behind. (Truncated files, unknown recipe keys, NaN and
matching-nothing recipes are in test_cli.py; header checks in tests/io/.)"""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

import quantkit
from quantkit.cli import main
from quantkit.errors import CheckpointError
from quantkit.io import artifact
from quantkit.streaming import partial_dir


def _hash_tree(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _compress(capsys, src, out, *extra):
    before = _hash_tree(src)
    code = main(["compress", str(src), "--recipe", "nf4", "-o", str(out), "--quiet", *map(str, extra)])
    _, err = capsys.readouterr()
    assert _hash_tree(src) == before  # input untouched
    lines = [line for line in err.strip().splitlines() if line.startswith("quantkit: error")]
    if code:
        assert len(lines) == 1 and "Traceback" not in err, err
        assert not Path(out).exists() and not partial_dir(out).exists()
        assert not [p for p in Path(out).parent.iterdir() if ".partial" in p.name or ".old-" in p.name]
    return code, (lines[0] if lines else "")


def _rewrite_header(path: Path, change) -> None:
    """Apply ``change(header)`` to a safetensors file's JSON header, keeping the data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


@pytest.fixture
def model_copy(tiny_llama_dir, tmp_path):
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


@pytest.fixture(scope="module")
def sharded_dir(tiny_llama_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(folder, max_shard_size="40KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / f, folder / f)
    return folder


def test_index_pointing_at_a_missing_shard(sharded_dir, tmp_path, capsys):
    d = Path(shutil.copytree(sharded_dir, tmp_path / "m"))
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    code, line = _compress(capsys, d, tmp_path / "o")
    assert code == 1 and str(shard) in line and "missing" in line


def test_index_naming_a_shard_that_lacks_the_tensor(sharded_dir, tmp_path, capsys):
    d = Path(shutil.copytree(sharded_dir, tmp_path / "m"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    names = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == names[0])
    index["weight_map"][key] = names[-1]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    code, line = _compress(capsys, d, tmp_path / "o")
    assert code == 1 and key in line and names[-1] in line


def test_header_lying_about_offsets(model_copy, tmp_path, capsys):
    f = model_copy / "model.safetensors"

    name = "model.layers.0.input_layernorm.weight"  # not the last tensor in the file

    def shift(h):
        e = h[name]
        e["data_offsets"] = [e["data_offsets"][0] + 4, e["data_offsets"][1] + 4]
    _rewrite_header(f, shift)
    code, line = _compress(capsys, model_copy, tmp_path / "o")
    assert code == 1 and str(f) in line and name in line


def test_header_lying_about_shape(model_copy, tmp_path, capsys):
    """Same byte count, transposed shape: only the model's config can tell."""
    f = model_copy / "model.safetensors"
    _rewrite_header(f, lambda h: h["model.layers.0.mlp.up_proj.weight"].update(shape=[64, 128]))
    code, line = _compress(capsys, model_copy, tmp_path / "o")
    assert code == 1 and str(f) in line and "model.layers.0.mlp.up_proj.weight" in line and "[128, 64]" in line


def test_header_lying_about_dtype(model_copy, tmp_path, capsys):
    f = model_copy / "model.safetensors"
    _rewrite_header(f, lambda h: h["model.layers.1.self_attn.q_proj.weight"].update(dtype="I32"))
    code, line = _compress(capsys, model_copy, tmp_path / "o")
    assert code == 1 and str(f) in line and "I32" in line


def test_header_dtype_changing_the_byte_size(model_copy, tmp_path, capsys):
    f = model_copy / "model.safetensors"
    _rewrite_header(f, lambda h: h["model.layers.1.self_attn.q_proj.weight"].update(dtype="F16"))
    code, line = _compress(capsys, model_copy, tmp_path / "o")
    assert code == 1 and str(f) in line and "q_proj" in line


def test_unsupported_architecture_lists_supported_ones(model_copy, tmp_path, capsys):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "wav2vec2"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    code, line = _compress(capsys, model_copy, tmp_path / "o")
    assert code == 2 and "wav2vec2" in line and "supported model types:" in line


def test_missing_config_json(model_copy, tmp_path, capsys):
    (model_copy / "config.json").unlink()
    code, line = _compress(capsys, model_copy, tmp_path / "o")
    assert code == 2 and "config.json" in line


def test_missing_tensor_is_named(model_copy, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    f = model_copy / "model.safetensors"
    sd = load_file(str(f))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(f), metadata={"format": "pt"})
    code, line = _compress(capsys, model_copy, tmp_path / "o")
    assert code == 1 and "model.layers.1.mlp.down_proj.weight" in line


def test_inf_weights_refused_unless_allowed(model_copy, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    f = model_copy / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.0.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(sd, str(f), metadata={"format": "pt"})
    code, line = _compress(capsys, model_copy, tmp_path / "o")
    assert code == 1 and "model.layers.0.self_attn.o_proj.weight" in line and "Inf" in line and str(f) in line
    code, _ = _compress(capsys, model_copy, tmp_path / "o", "--allow-nonfinite")
    assert code == 0 and (tmp_path / "o" / "model.safetensors").is_file()


def test_allow_empty(model_copy, tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("passes:\n  - pass: nf4\n    targets: ['no_such_module']\n")
    code = main(["compress", str(model_copy), "--recipe", str(r), "-o", str(tmp_path / "o"), "--quiet",
                 "--allow-empty"])
    assert code == 0 and artifact.read_metadata(tmp_path / "o")["modules"] == {}


def test_recipe_value_out_of_range(model_copy, tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("passes:\n  - pass: nf4\n    blocksize: 3\n")
    code = main(["compress", str(model_copy), "--recipe", str(r), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "blocksize" in err and "3" in err and str(r) in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("size, fragment", [("0", "out of range"), ("20TB", "out of range"), ("2 parsecs", "not a size")])
def test_shard_size_out_of_range(model_copy, tmp_path, capsys, size, fragment):
    code, line = _compress(capsys, model_copy, tmp_path / "o", "--max-shard-size", size)
    assert code == 2 and fragment in line


def test_newer_version_in_one_shard_is_refused(tiny_llama_dir, tmp_path, capsys):
    assert main(["compress", str(tiny_llama_dir), "--recipe", "nf4", "-o", str(tmp_path / "a"), "--quiet",
                 "--max-shard-size", "30KB"]) == 0
    shard = sorted((tmp_path / "a").glob("model-*.safetensors"))[-1]
    _rewrite_header(shard, lambda h: h["__metadata__"].update({"quantkit.format_version": "7"}))
    with pytest.raises(CheckpointError, match=r"version 7, newer than this quantkit reads \(1\)"):
        quantkit.load(tmp_path / "a")
    before = _hash_tree(tmp_path / "a")
    code, line = _compress(capsys, tmp_path / "a", tmp_path / "o")  # an artifact as MODEL
    assert code == 1 and "version 7" in line and str(shard) in line
    assert _hash_tree(tmp_path / "a") == before


def test_shards_of_different_artifacts_are_refused(tiny_llama_dir, tmp_path, capsys):
    for name, recipe in (("a", "nf4"), ("b", "fp4")):
        assert main(["compress", str(tiny_llama_dir), "--recipe", recipe, "-o", str(tmp_path / name), "--quiet",
                     "--max-shard-size", "30KB"]) == 0
    shard = sorted((tmp_path / "a").glob("model-*.safetensors"))[0]
    shutil.copy(sorted((tmp_path / "b").glob("model-*.safetensors"))[0], shard)
    with pytest.raises(CheckpointError, match="differs"):
        artifact.read_metadata(tmp_path / "a")
