"""Calibration plumbing: CalibSource windows, and calibrated passes receiving them from
quantkit.compress and `quantkit compress` (which loads the model whole for them)."""


import pytest
import torch

import quantkit

from quantkit.calibration import CalibSource, calib_source
from quantkit.errors import UsageError


class _CharTokenizer:
    """One token per character (ids = code points), enough to test windowing exactly."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_batches_are_windows_of_the_text_and_deterministic():
    text = "".join(chr(65 + i % 26) for i in range(1000))
    src = CalibSource(_CharTokenizer(), text)
    ids = torch.tensor([ord(c) for c in text])
    b = src.batches(5, 64, seed=3)
    assert b.shape == (5, 64) and b.dtype == torch.long
    for row in b:
        start = int(row[0] - 65) % 26  # every window is a contiguous slice of the text
        found = [s for s in range(start, 1000 - 63, 26) if torch.equal(ids[s:s + 64], row)]
        assert found
    assert torch.equal(b, src.batches(5, 64, seed=3))
    assert not torch.equal(b, src.batches(5, 64, seed=4))


def test_batches_disjoint_when_the_text_allows():
    text = "".join(chr(0x4E00 + i) for i in range(640))  # every token distinct
    b = CalibSource(_CharTokenizer(), text).batches(10, 64, seed=0)
    assert len(set(b.flatten().tolist())) == 640


def test_batches_overlap_when_more_samples_than_tiles():
    b = CalibSource(_CharTokenizer(), "x" * 100).batches(8, 64)
    assert b.shape == (8, 64)


def test_text_shorter_than_a_window_is_refused():
    with pytest.raises(UsageError, match="fewer than one window of 64"):
        CalibSource(_CharTokenizer(), "short").batches(1, 64)


def test_model_without_tokenizer_is_refused():
    with pytest.raises(UsageError, match="tokenizer"):
        calib_source(torch.nn.Linear(2, 2))


def test_compress_hands_calibration_to_calibrated_passes(tiny_llama_dir, record_pass):
    import quantkit

    model = quantkit.load_model(tiny_llama_dir)
    quantkit.compress(model, {"version": 1, "name": "r", "passes": [{"pass": "record", "seq_len": 8}]},
                      progress=False, calib_text="hello world " * 50)
    (b,) = record_pass
    assert b.shape == (2, 8)
    tok = model._quantkit_tokenizer
    assert tok.decode(b[0]) in "hello world " * 50


def test_cli_compress_of_a_folder_loads_whole_for_calibrated_pass(tiny_llama_dir, record_pass, tmp_path):
    from quantkit.streaming import compress_to_dir

    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    msgs = []
    recipe = {"version": 1, "name": "r", "passes": [{"pass": "record"}, {"pass": "nf4"}]}
    compress_to_dir(tiny_llama_dir, recipe, tmp_path / "out", progress=False, status=msgs.append,
                    calib_text=text.read_text())
    assert any("loading" in m and "pass record needs the whole model" in m for m in msgs), msgs
    assert len(record_pass) == 1 and record_pass[0].shape == (2, 16)
    assert (tmp_path / "out" / "model.safetensors").exists() or list((tmp_path / "out").glob("*.safetensors"))


def test_cli_calib_text_reaches_the_pass_and_a_missing_file_is_a_usage_error(tiny_llama_dir, record_pass, tmp_path,
                                                                               capsys):
    import yaml

    from quantkit.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"version": 1, "name": "r", "passes": [{"pass": "record", "seq_len": 4},
                                                                             {"pass": "nf4"}]}))
    code = main(["compress", str(tiny_llama_dir), "--recipe", str(recipe), "-o", str(tmp_path / "a"), "--quiet",
                 "--calib-text", str(tmp_path / "missing.txt")])
    assert code == 2 and "missing.txt" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not record_pass
    text = tmp_path / "c.txt"
    text.write_text("zebra " * 100)
    assert main(["compress", str(tiny_llama_dir), "--recipe", str(recipe), "-o", str(tmp_path / "b"), "--quiet",
                 "--calib-text", str(text)]) == 0
    (b,) = record_pass
    tok = quantkit.load_model(tiny_llama_dir)._quantkit_tokenizer
    assert tok.decode(b[0]) in "zebra " * 100
