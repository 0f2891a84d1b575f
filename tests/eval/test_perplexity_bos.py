"""perplexity() windows start with BOS exactly when the tokenizer adds one by default."""

import math

import pytest
import torch

from quantkit.errors import UsageError
from quantkit.eval.perplexity import perplexity
from quantkit.models.text import default_text
from quantkit.models.tokens import cut_windows, default_bos

def _hand_nll(model, windows: torch.Tensor) -> float:
    """Mean NLL of every token but the first of each window, predicted from the ones before."""
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits.double(), dim=-1)
        return (-logp[:, :-1].gather(-1, windows[:, 1:, None]).squeeze(-1)).mean().item()


def test_cut_windows_with_and_without_bos():
    ids = torch.arange(10, 60)
    plain = cut_windows(ids, 8, None)
    assert plain.shape == (6, 8) and torch.equal(plain.flatten(), ids[:48])
    with_bos = cut_windows(ids, 8, 1)
    assert with_bos.shape == (7, 8) and (with_bos[:, 0] == 1).all()
    assert torch.equal(with_bos[:, 1:].flatten(), ids[:49])
    assert cut_windows(ids, 8, 1, max_windows=2).shape == (2, 8)


def test_default_bos_follows_the_tokenizer(bos_tokenizer, tiny_llama_dir):
    from transformers import AutoTokenizer

    assert default_bos(bos_tokenizer) == bos_tokenizer.bos_token_id is not None
    assert default_bos(AutoTokenizer.from_pretrained(tiny_llama_dir)) is None  # adds nothing, as SmolLM2


def test_perplexity_with_a_bos_tokenizer_scores_every_text_token_after_bos(tiny_model, bos_tokenizer):
    seq = 32
    text = default_text("eval")[:4000]
    r = perplexity(tiny_model, bos_tokenizer, text, seq_len=seq, max_tokens=3 * (seq - 1) + 4, progress=False)
    ids = torch.tensor(bos_tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = bos_tokenizer.bos_token_id
    windows = torch.cat([torch.full((3, 1), bos), ids[:3 * (seq - 1)].view(3, seq - 1)], dim=1)
    assert r.bos == bos and "BOS" in r.convention
    assert r.n_windows == 3 and r.n_tokens == 3 * (seq - 1)  # as many predictions as without BOS
    assert r.nll_mean == pytest.approx(_hand_nll(tiny_model, windows), rel=1e-6)
    assert r.ppl == pytest.approx(math.exp(r.nll_mean))


def test_bos_can_be_forced_on_or_off(tiny_model, bos_tokenizer, tiny_llama_dir):
    from transformers import AutoTokenizer

    text = default_text("eval")[:4000]
    off = perplexity(tiny_model, bos_tokenizer, text, seq_len=32, max_tokens=96, progress=False, bos=None)
    ids = torch.tensor(bos_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert off.bos is None and off.n_windows == 3
    assert off.nll_mean == pytest.approx(_hand_nll(tiny_model, ids[:96].view(3, 32)), rel=1e-6)
    plain_tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert perplexity(tiny_model, plain_tok, text, seq_len=32, max_tokens=96, progress=False).bos is None
    forced = perplexity(tiny_model, plain_tok, text, seq_len=32, max_tokens=96, progress=False, bos=7)
    assert forced.bos == 7 and forced.n_windows == 3
    with pytest.raises(UsageError, match="bos must be"):
        perplexity(tiny_model, plain_tok, text, seq_len=32, progress=False, bos="yes")


def test_cli_eval_prints_the_convention(tiny_llama_dir, capsys):
    import json

    from quantkit.cli import main

    assert main(["eval", str(tiny_llama_dir), "--seq-len", "64", "--max-tokens", "256", "--quiet"]) == 0
    assert "windows start with text (no BOS)" in capsys.readouterr().out
    assert main(["eval", str(tiny_llama_dir), "--seq-len", "64", "--max-tokens", "256", "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bos"] is None and result["tokens"] == 4 * 63
    # this tokenizer has no BOS token at all: forcing one is a clear error
    assert main(["eval", str(tiny_llama_dir), "--seq-len", "64", "--quiet", "--bos", "on"]) == 2
    assert "--bos on: this tokenizer has no BOS token" in capsys.readouterr().err
