"""`quantkit export OUT --to hf-bnb|onnx -o DEST`: end to end and every bad-input path (issue #7)."""

import json

import pytest

import quantkit
from quantkit.cli import main


def _run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def nf4_out(tiny_llama_dir, tmp_path_factory):
    return quantkit.save(quantkit.compress(str(tiny_llama_dir), "nf4", progress=False),
                         tmp_path_factory.mktemp("cli-export") / "nf4")


def test_export_hf_bnb_refuses_existing_then_overwrites(nf4_out, tmp_path, capsys):
    dest = tmp_path / "hf"
    code, out, err = _run(capsys, "export", nf4_out, "--to", "hf-bnb", "-o", dest)
    assert code == 0, err
    assert f"wrote {dest} (hf-bnb)" in out
    assert json.loads((dest / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"

    code, out, err = _run(capsys, "export", nf4_out, "--to", "hf-bnb", "-o", dest, "--quiet")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1

    code, out, err = _run(capsys, "export", nf4_out, "--to", "hf-bnb", "-o", dest, "--overwrite")
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_export_onnx(nf4_out, tmp_path, capsys):
    dest = tmp_path / "onnx"
    code, out, err = _run(capsys, "export", nf4_out, "--to", "onnx", "-o", dest)
    assert code == 0, err
    assert (dest / "model.onnx").exists() and f"wrote {dest} (onnx)" in out


def test_bad_inputs(nf4_out, tmp_path, capsys):
    code, _, err = _run(capsys, "export", nf4_out, "--to", "tflite", "-o", tmp_path / "x")
    assert code == 2 and "invalid choice: 'tflite'" in err and "hf-bnb" in err and "onnx" in err
    code, _, err = _run(capsys, "export", nf4_out, "-o", tmp_path / "x")
    assert code == 2 and "--to" in err
    code, _, err = _run(capsys, "export", tmp_path / "missing", "--to", "onnx", "-o", tmp_path / "x")
    assert code == 2 and "does not exist" in err
    code, _, err = _run(capsys, "export", tmp_path, "--to", "hf-bnb", "-o", tmp_path / "x")
    assert code == 1 and "not a quantkit artifact" in err
    assert not (tmp_path / "x").exists()


def test_unsupported_format_is_one_line_and_debug_shows_traceback(nf4_out, tmp_path, capsys, monkeypatch):
    from quantkit.io import hf_bnb

    monkeypatch.setattr(hf_bnb, "HF_BNB_FORMATS", {})
    code, _, err = _run(capsys, "export", nf4_out, "--to", "hf-bnb", "-o", tmp_path / "x", "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot export module model.layers.0." in err and "(Lut4Linear, format lut4/nf4)" in err
    code, _, err = _run(capsys, "export", nf4_out, "--to", "hf-bnb", "-o", tmp_path / "x", "--debug")
    assert code == 2 and "Traceback" in err
    assert not (tmp_path / "x").exists()
