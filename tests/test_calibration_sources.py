"""Calibration from the caller's data: ``quantkit.compress(model, recipe, tokenizer=, calib=)``
with a text, a list of texts, a datasets.Dataset or token ids; windows start with BOS when the
tokenizer adds one by default; the messages for a missing tokenizer (Python and CLI)."""


import pytest
import torch

import quantkit
from quantkit.calibration import CalibSource, calib_source
from quantkit.errors import UsageError

RECIPE = {"version": 1, "name": "r", "passes": [{"pass": "record", "n_samples": 3, "seq_len": 12}]}


@pytest.fixture
def bare_model(tiny_llama_dir):
    """The tiny Llama as a fine-tuning script holds it: from transformers, no tokenizer attached."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir)


@pytest.fixture
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _is_slice(window: torch.Tensor, stream: torch.Tensor) -> bool:
    n = window.numel()
    return any(torch.equal(stream[s:s + n], window) for s in range(stream.numel() - n + 1))


def test_text_list_and_tensor_forms_reach_the_pass(bare_model, tok, record_pass):
    text = "the quick brown fox jumps over the lazy dog. " * 30
    stream = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    quantkit.compress(bare_model, RECIPE, tokenizer=tok, calib=text, progress=False)
    quantkit.compress(bare_model, RECIPE, tokenizer=tok, calib=[text[:600], text[600:]], progress=False)
    quantkit.compress(bare_model, RECIPE, calib=stream, progress=False)  # ids need no tokenizer
    quantkit.compress(bare_model, RECIPE, calib=stream[:480].view(4, 120), progress=False)
    assert len(record_pass) == 4
    for b in record_pass:
        assert b.shape == (3, 12) and b.dtype == torch.long
    assert all(_is_slice(w, stream) for w in record_pass[0])
    assert all(_is_slice(w, stream) for w in record_pass[2]) and all(_is_slice(w, stream[:480]) for w in record_pass[3])
    # the list is joined with a blank line: every window is a slice of that joined text's ids
    joined = torch.tensor(tok(text[:600] + "\n\n" + text[600:], add_special_tokens=False)["input_ids"])
    assert all(_is_slice(w, joined) for w in record_pass[1])
    assert torch.equal(record_pass[2], record_pass[0])  # the same stream, the same seed: the same windows


def test_a_datasets_dataset_is_read_from_its_text_column(bare_model, tok, record_pass):
    datasets = pytest.importorskip("datasets")
    rows = ["zebras graze on the open plain " * 5, "a second document about lions " * 5]
    ds = datasets.Dataset.from_dict({"text": rows, "label": [0, 1]})
    quantkit.compress(bare_model, RECIPE, tokenizer=tok, calib=ds, progress=False)
    joined = torch.tensor(tok("\n\n".join(rows), add_special_tokens=False)["input_ids"])
    assert all(_is_slice(w, joined) for w in record_pass[0])
    # no "text" column: the only string column is taken; two of them is a question for the caller
    quantkit.compress(bare_model, RECIPE, tokenizer=tok, calib=ds.rename_column("text", "body"), progress=False)
    assert torch.equal(record_pass[1], record_pass[0])
    two = datasets.Dataset.from_dict({"a": rows, "b": rows})
    with pytest.raises(UsageError, match="no 'text' column and 2 string columns.*columns: a, b"):
        quantkit.compress(bare_model, RECIPE, tokenizer=tok, calib=two, progress=False)


@pytest.mark.parametrize("calib, message", [
    (3.5, "calib must be a str, a list of str, a datasets.Dataset"),
    (["fine", 7], "only str texts, found a int"),
    ("   \n", "holds no text"),
    ([], "holds no text"),
    (torch.randn(40), "integer tensor, got torch.float32"),
    (torch.zeros(2, 3, 4, dtype=torch.long), r"\[T\] or \[N, L\]"),
    (torch.tensor([3, -1, 4]), ">= 0"),
])
def test_bad_calibration_data_is_refused_before_any_pass_runs(bare_model, tok, record_pass, calib, message):
    with pytest.raises(UsageError, match=message):
        quantkit.compress(bare_model, {"version": 1, "name": "r", "passes": [{"pass": "nf4"}, {"pass": "record"}]},
                          tokenizer=tok, calib=calib, progress=False)
    assert not record_pass


def test_text_without_a_tokenizer_names_the_tokenizer_argument(bare_model, record_pass):
    with pytest.raises(UsageError, match=r"pass tokenizer=AutoTokenizer\.from_pretrained"):
        quantkit.compress(bare_model, RECIPE, calib="some text " * 50, progress=False)
    with pytest.raises(UsageError, match="tokenizer="):
        quantkit.compress(bare_model, RECIPE, progress=False)  # the shipped text needs one too
    with pytest.raises(UsageError, match="give the calibration data once"):
        quantkit.compress(bare_model, RECIPE, calib="a " * 40, calib_text="b " * 40, progress=False)


def test_the_tokenizer_given_is_saved_with_the_artifact(bare_model, tok, tmp_path):
    out = quantkit.save(quantkit.compress(bare_model, "recipes/nf4.yaml", tokenizer=tok, progress=False),
                        tmp_path / "out")
    loaded = quantkit.load_model(out)
    assert loaded._quantkit_tokenizer("hello there")["input_ids"] == tok("hello there")["input_ids"]


def test_windows_start_with_bos_when_the_tokenizer_adds_one(bos_tokenizer):
    from quantkit.models.text import default_text

    text = default_text("calib")[:20_000]
    src = CalibSource(bos_tokenizer, text)
    stream = src.token_ids()
    assert int(stream[0]) != bos_tokenizer.bos_token_id  # the stream itself is plain text
    b = src.batches(6, 32, seed=1)
    assert b.shape == (6, 32)
    assert (b[:, 0] == bos_tokenizer.bos_token_id).all()
    assert all(_is_slice(w[1:], stream) for w in b)
    # disjoint: 31 text tokens per window tile the text
    starts = [next(s for s in range(stream.numel()) if torch.equal(stream[s:s + 31], w[1:])) for w in b]
    assert len(set(s % 31 for s in starts)) == 1 and len(set(starts)) == 6


def test_token_ids_get_bos_only_from_a_tokenizer_that_adds_it(bos_tokenizer):
    ids = torch.arange(3, 200)
    plain = calib_source(None, calib=ids).batches(2, 16)
    assert not (plain[:, 0] == bos_tokenizer.bos_token_id).all() and plain.shape == (2, 16)
    with_bos = calib_source(None, tokenizer=bos_tokenizer, calib=ids).batches(2, 16)
    assert (with_bos[:, 0] == bos_tokenizer.bos_token_id).all()
    assert all(_is_slice(w[1:], ids) for w in with_bos)


def test_cli_names_tokenizer_and_calib_text_for_a_folder_without_tokenizer(tiny_llama_dir, tmp_path, capsys):
    import shutil

    from quantkit.cli import main

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, bare / name)
    code = main(["compress", str(bare), "--recipe", "recipes/bitstack.yaml", "-o", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    for needle in ("pass bitstack", "no tokenizer files", "tokenizer.json", "--tokenizer DIR", "--calib-text"):
        assert needle in err, (needle, err)
    assert "Traceback" not in err and "_quantkit_tokenizer" not in err
    assert not (tmp_path / "o").exists()
    # an nf4 recipe needs no tokenizer; --tokenizer gives the artifact one
    assert main(["compress", str(bare), "--recipe", "recipes/nf4.yaml", "-o", str(tmp_path / "n"), "--quiet",
                 "--tokenizer", str(tiny_llama_dir)]) == 0
    assert (tmp_path / "n" / "tokenizer.json").is_file()
    code = main(["compress", str(bare), "--recipe", "recipes/nf4.yaml", "-o", str(tmp_path / "m"), "--quiet",
                 "--tokenizer", str(bare)])
    assert code == 2 and "holds no tokenizer files" in capsys.readouterr().err
