"""quantkit.runtime.generate on tiny random Llama / Qwen2 / Gemma3 models, uncompressed and
packed (nf4, qat int4): greedy equals ``model.generate``, the static KV cache across the
prefill/decode boundary, seeded sampling, threads, streaming, bad input, and the CLI."""

import json

import pytest
import torch

import quantkit
from quantkit import cli
from quantkit.errors import UsageError
from quantkit.runtime import generate
from quantkit.runtime.text_stream import TextStream

W4 = {"version": 1, "name": "w4", "passes": [{"pass": "qat", "bits": 4, "quantizer": "lsq", "targets": ["re:.*"],
                                              "ignore": ["lm_head"]}]}
DUALBIN = {"version": 1, "name": "w2", "passes": [{"pass": "dbllm", "steps": 0, "block_steps": 0, "feedback": False,
                                                  "targets": ["re:.*"], "ignore": ["lm_head"]}]}
BITSTACK = {"version": 1, "name": "bs", "passes": [{"pass": "bitstack", "n_blocks": 3, "rank": 4, "calib_samples": 2,
                                                    "calib_seq_len": 32, "val_seq_len": 32, "order": "proxy"}]}
FORMATS = {"none": None, "nf4": "recipes/nf4.yaml", "w4": W4, "dualbin": DUALBIN, "bitstack": BITSTACK}
ARCHS = ["llama", "qwen2", "gemma3"]
CONTEXT = 256
PROMPT = "The Python standard library is very extensive, offering a wide range of facilities"


@pytest.fixture(scope="module")
def tok(plain_tokenizer):
    return plain_tokenizer


def _build(arch: str, vocab: int, eos: int):
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    # untied head and a wider init than the default: random tiny models otherwise tend to
    # repeat one token, which would make "greedy equal" trivially true
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT, eos_token_id=eos,
                  tie_word_embeddings=False, initializer_range=0.08)
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    # a sliding window of 8 on the first layer: long prompts cross it
    cfg = Gemma3TextConfig(**common, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg).eval()


_MODELS = {}


@pytest.fixture
def get_model(tok):
    def get(arch, fmt):
        if (arch, fmt) not in _MODELS:
            base = _MODELS.get((arch, "none")) or _build(arch, len(tok), tok.eos_token_id)
            _MODELS[(arch, "none")] = base
            if fmt != "none":
                _MODELS[(arch, fmt)] = quantkit.compress(base, FORMATS[fmt], progress=False, tokenizer=tok).eval()
        return _MODELS[(arch, fmt)]
    return get


def _hf_greedy(model, tok, prompt_ids, n):
    x = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                             pad_token_id=tok.eos_token_id, temperature=None, top_p=None, top_k=None)
    return out[0, len(prompt_ids):].tolist()


RUNTIME_NAME = {"lean": "lean", "static": "static-cache"}


@pytest.mark.parametrize("runtime", list(RUNTIME_NAME))
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_model_generate(get_model, tok, arch, fmt, runtime):
    model = get_model(arch, fmt)
    ids = tok(PROMPT)["input_ids"]
    r = generate(model, tok, PROMPT, max_new_tokens=24, runtime=runtime)
    assert r.ids == _hf_greedy(model, tok, ids, 24)
    assert len(set(r.ids)) > 1, r.ids  # not a constant stream
    assert r.prompt_tokens == len(ids) and r.new_tokens == len(r.ids) and r.runtime == RUNTIME_NAME[runtime]
    assert r.text == tok.decode(r.ids, skip_special_tokens=True)


@pytest.mark.parametrize("runtime", list(RUNTIME_NAME))
@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_across_prefill_and_decode(get_model, tok, arch, runtime):
    """A 150-token prompt (past Gemma3's sliding window of 8) and 40 decode steps: every new
    token is the argmax of a cache-free forward over everything before it."""
    model = get_model(arch, "none")
    ids = (tok(PROMPT * 20)["input_ids"])[:150]
    r = generate(model, tok, prompt_ids=ids, max_new_tokens=40, ignore_eos=True, runtime=runtime)
    assert r.new_tokens == 40
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids + r.ids]), use_cache=False).logits[0]
    assert logits[len(ids) - 1:-1].argmax(-1).tolist() == r.ids
    assert _hf_greedy(model, tok, ids, 40) == r.ids


def test_stops_at_eos_like_model_generate(get_model, tok):
    model = get_model("qwen2", "nf4")
    ids = tok(PROMPT)["input_ids"]
    free = generate(model, tok, PROMPT, max_new_tokens=24)
    eos = free.ids[5]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, eos]
    try:
        r = generate(model, tok, PROMPT, max_new_tokens=24)
        assert r.stopped == "eos" and r.ids == free.ids[:free.ids.index(eos) + 1]
        assert r.ids == _hf_greedy(model, tok, ids, 24)
    finally:
        model.generation_config.eos_token_id = old


def test_sampling_reproducible_under_a_seed(get_model, tok):
    model = get_model("llama", "nf4")
    a = generate(model, tok, PROMPT, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)
    b = generate(model, tok, PROMPT, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)
    c = generate(model, tok, PROMPT, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=4, ignore_eos=True)
    greedy = generate(model, tok, PROMPT, max_new_tokens=16, ignore_eos=True)
    assert a.ids == b.ids
    assert a.ids != c.ids and a.ids != greedy.ids


def test_top_p_keeps_only_the_nucleus():
    from quantkit.runtime.sampling import next_token

    logits = torch.tensor([[5.0, 4.0, -10.0, -10.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(next_token(logits, 1.0, 0.5, g)) for _ in range(50)}
    assert picks == {0}  # token 0 alone holds > 50 % of the mass
    assert {int(next_token(logits, 1.0, 0.999, g)) for _ in range(200)} == {0, 1}


def test_threads_honoured_and_restored(get_model, tok):
    model = get_model("llama", "none")
    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = generate(model, tok, PROMPT, max_new_tokens=6, threads=1, stream=lambda s: seen.append(
            torch.get_num_threads()))
        assert seen and set(seen) == {1} and r.threads == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_stream_pieces_make_the_text(get_model, tok):
    pieces = []
    r = generate(get_model("gemma3", "w4"), tok, PROMPT, max_new_tokens=20, stream=pieces.append)
    assert "".join(pieces) == r.text and len(pieces) > 1


def test_text_stream_never_splits_a_character(tok):
    text = "naïve café — 日本語 ok"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    s = TextStream(tok)
    pieces = [s.push(i) for i in ids] + [s.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text


def test_bad_input(get_model, tok):
    model = get_model("llama", "none")
    with pytest.raises(UsageError, match="prompt is empty"):
        generate(model, tok, "")
    for n in (0, -3):
        with pytest.raises(UsageError, match="max_new_tokens must be at least 1"):
            generate(model, tok, PROMPT, max_new_tokens=n)
    n_prompt = len(tok(PROMPT)["input_ids"])
    with pytest.raises(UsageError, match=rf"prompt \({n_prompt} tokens\).*\({CONTEXT - n_prompt + 1}\).*context of "
                                         rf"{CONTEXT} tokens"):
        generate(model, tok, PROMPT, max_new_tokens=CONTEXT - n_prompt + 1)
    with pytest.raises(UsageError, match="temperature"):
        generate(model, tok, PROMPT, temperature=-1)
    with pytest.raises(UsageError, match="top_p"):
        generate(model, tok, PROMPT, temperature=1, top_p=0)


def test_fallback_to_model_generate(get_model, tok, capsys):
    model = get_model("qwen2", "nf4")
    model._can_compile_fullgraph = False  # as an architecture without static-cache support
    try:
        r = generate(model, tok, PROMPT, max_new_tokens=12, runtime="static")
    finally:
        del model._can_compile_fullgraph
    assert r.runtime == "model.generate" and "does not support a static KV cache" in r.fallback_reason
    assert capsys.readouterr().err.count("falls back to model.generate") == 1
    assert r.ids == generate(model, tok, PROMPT, max_new_tokens=12).ids


def test_architecture_without_a_lean_plan_runs_the_static_loop(get_model, tok):
    """auto picks the static-cache loop for a model type the lean forward does not implement;
    runtime="lean" says why it cannot run it."""
    model = get_model("llama", "none")
    old = model.config.model_type
    model.config.model_type = "not_llama"
    try:
        r = generate(model, tok, PROMPT, max_new_tokens=8)
        assert r.runtime == "static-cache"
        with pytest.raises(UsageError, match="lean runtime cannot run.*'not_llama'"):
            generate(model, tok, PROMPT, max_new_tokens=8, runtime="lean")
    finally:
        model.config.model_type = old
    assert r.ids == generate(model, tok, PROMPT, max_new_tokens=8).ids
    with pytest.raises(UsageError, match="runtime must be one of auto, lean, static"):
        generate(model, tok, PROMPT, runtime="fast")
    with pytest.raises(UsageError, match="compile runs the model's own forward"):
        generate(model, tok, PROMPT, runtime="lean", compile=True)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tok):
    model = quantkit.compress(_build("qwen2", len(tok), tok.eos_token_id), "recipes/nf4.yaml", progress=False,
                              tokenizer=tok)
    out = tmp_path_factory.mktemp("gen") / "qwen2-nf4"
    quantkit.save(model, out)
    return out


def test_cli_end_to_end(artifact, tok, capsys):
    assert cli.main(["generate", str(artifact), "--prompt", PROMPT, "-n", "12", "--threads", "1", "-q"]) == 0
    out, err = capsys.readouterr()
    expected = generate(quantkit.load(artifact), tok, PROMPT, max_new_tokens=12)
    assert out == expected.text + "\n"
    assert "decode 12 tokens at" in err and "1 threads" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["generate", str(artifact), "-p", PROMPT, "-n", "4", "--json", "-q", "--temperature", "0.7",
                     "--seed", "5"]) == 0
    stats = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert stats["new_tokens"] == 4 and stats["decode_tokens_per_s"] > 0 and stats["runtime"] == "lean"


def test_cli_bad_input(artifact, tiny_llama_dir, tmp_path, capsys):
    cases = [(["-p", ""], "--prompt is empty"), (["-p", "x", "-n", "0"], "--max-new-tokens must be at least 1"),
             (["-p", PROMPT, "-n", "1000"], f"context of {CONTEXT} tokens")]
    for extra, msg in cases:
        assert cli.main(["generate", str(artifact), "-q", *extra]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    bare = tmp_path / "bare"  # weights and config, no tokenizer files
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(bare)
    assert cli.main(["generate", str(bare), "-q", "-p", "hello"]) == 2
    assert "has no tokenizer files" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ARCHS)
def test_lean_forward_prompt_in_chunks(get_model, tok, arch):
    """A prompt prefilled in two chunks (the second starting at position 37, the masked path, past
    Gemma3's window of 8) gives the logits of one whole-prompt forward and of the model itself."""
    from quantkit.runtime.decoder_plan import plan_decoder
    from quantkit.runtime.lean_forward import KVCache, lean_forward

    model = get_model(arch, "none")
    ids = torch.tensor([(tok(PROMPT * 6)["input_ids"])[:60]])
    plan = plan_decoder(model)
    with torch.inference_mode():
        whole = lean_forward(plan, KVCache.for_plan(plan, 64, torch.float32), ids, 0)
        cache = KVCache.for_plan(plan, 64, torch.float32)
        lean_forward(plan, cache, ids[:, :37], 0)
        chunked = lean_forward(plan, cache, ids[:, 37:], 37)
        ref = model(input_ids=ids, use_cache=False).logits[:, -1]
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="do not fit the cache of 64"):
        lean_forward(plan, cache, ids[:, :10], 60)
