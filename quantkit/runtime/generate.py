"""The decode loop: prefill the prompt in one forward, then one forward per new token on a
preallocated static KV cache; greedy or seeded temperature/top-p sampling; streamed text.

    quantkit.runtime.generate(model, tokenizer, "Once upon a time", max_new_tokens=64, stream=print)

Greedy output is identical to ``model.generate(do_sample=False)`` on the same model (tested
for Llama, Qwen2, Gemma3, on plain and packed linears). Architectures whose transformers
class cannot use a static cache fall back to ``model.generate`` with one line on stderr.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from quantkit.errors import UsageError
from quantkit.runtime.decoder_plan import DecoderPlan, plan_decoder
from quantkit.runtime.lean_forward import KVCache, lean_forward
from quantkit.runtime.model_info import context_length, eos_ids, model_device, static_cache_unsupported
from quantkit.runtime.result import GenerateResult
from quantkit.runtime.sampling import check_sampling, next_token
from quantkit.runtime.text_stream import TextStream


def generate(model: nn.Module, tokenizer, prompt: Optional[str] = None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, threads: Optional[int] = None,
             stream: Optional[Callable[[str], None]] = None, prompt_ids: Optional[Sequence[int]] = None,
             ignore_eos: bool = False, compile: bool = False, runtime: str = "auto") -> GenerateResult:
    """Generate up to ``max_new_tokens`` tokens after ``prompt`` (batch 1).

    prompt: text, tokenized with the tokenizer's defaults (its BOS when it adds one), or
    ``prompt_ids`` (1-D ints) instead. temperature 0 = greedy; > 0 samples with top_p from a
    ``torch.Generator`` seeded with ``seed``. threads: torch CPU threads for the call (restored
    after). stream: called with each new piece of text as it is decoded. ignore_eos: run all
    ``max_new_tokens`` steps (speed measurements). compile: ``torch.compile`` the one-token
    step of the model's own forward on a static cache (implies runtime "static"; see
    docs/benchmarks.md, "Decode runtime", for whether it pays).
    runtime: "auto" (the lean forward of quantkit/runtime/lean_forward.py on architectures it
    implements, else the model's own forward on a transformers StaticCache), "lean" (an error
    naming the reason when the model has no lean plan) or "static" (always the model's forward).

    UsageError for an empty prompt, max_new_tokens <= 0, bad sampling settings, or a prompt +
    max_new_tokens longer than the model's context.
    """
    ids = _prompt_ids(tokenizer, prompt, prompt_ids)
    if max_new_tokens <= 0:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    check_sampling(temperature, top_p)
    ctx = context_length(model)
    if ctx is not None and len(ids) + max_new_tokens > ctx:
        raise UsageError(f"the prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) = "
                         f"{len(ids) + max_new_tokens} tokens is longer than the model's context of {ctx} tokens")
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    if runtime not in RUNTIMES:
        raise UsageError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if compile and runtime == "lean":
        raise UsageError("compile runs the model's own forward on a static cache (runtime 'static'): the lean "
                         "forward slices its cache to each step's length, so a compiled step would recompile "
                         "every token")
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        plan = "runtime 'static' was asked for" if runtime == "static" or compile else plan_decoder(model)
        if runtime == "lean" and isinstance(plan, str):
            raise UsageError(f"the lean runtime cannot run {type(model).__name__}: {plan}")
        loop_args = (model, tokenizer, ids, max_new_tokens, temperature, top_p, seed, stream, ignore_eos, compile)
        if not isinstance(plan, str):
            return _run_loop(*loop_args, lambda: _lean_engine(model, plan, len(ids), max_new_tokens))
        reason = static_cache_unsupported(model)
        if reason is None:
            return _run_loop(*loop_args, lambda: _static_engine(model, len(ids), max_new_tokens, compile))
        print(f"quantkit: generate falls back to model.generate: {reason}", file=sys.stderr)
        from quantkit.runtime.fallback import hf_generate
        return hf_generate(model, tokenizer, ids, max_new_tokens, temperature, top_p, seed, stream, ignore_eos,
                           reason)
    finally:
        torch.set_num_threads(threads_before)


def _prompt_ids(tokenizer, prompt, prompt_ids) -> list:
    if prompt_ids is not None:
        ids = [int(i) for i in torch.as_tensor(prompt_ids).reshape(-1).tolist()]
    else:
        if prompt is None or prompt == "":
            raise UsageError("the prompt is empty; give some text to continue")
        if tokenizer is None:
            raise UsageError("generate needs a tokenizer to encode the prompt (or prompt_ids)")
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise UsageError("the prompt is empty (it encodes to no tokens); give some text to continue")
    return ids


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5.x renamed forward's ``past_key_values`` to ``cache`` (the old name warns)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


RUNTIMES = ("auto", "lean", "static")
CACHE_BUCKET = 256  # tokens: compiled steps are reused by every run whose cache rounds up to the same length


def _cache_len(model: nn.Module, needed: int, compile: bool) -> int:
    """Tokens of KV cache to preallocate: exactly ``needed`` eagerly; with ``compile`` rounded up to
    a multiple of CACHE_BUCKET (within the context), since the cache's shape is baked into the
    compiled graph and every new length would recompile it (~100 s for SmolLM2-135M on 2 cores)."""
    if not compile:
        return needed
    ctx = context_length(model) or needed
    return max(needed, min(-(-needed // CACHE_BUCKET) * CACHE_BUCKET, ctx))


def _static_engine(model, n_prompt: int, max_new_tokens: int, compile: bool):
    """(prefill, step) on the model's own forward and a transformers StaticCache."""
    from transformers import StaticCache

    device = model_device(model)
    step_model = torch.compile(model, dynamic=False) if compile else model
    cache_kw = _cache_keyword(model)
    # preallocated for the whole run: the cache never grows or copies during decode
    cache = StaticCache(config=model.config, max_cache_len=_cache_len(model, n_prompt + max_new_tokens, compile))

    def prefill(x):
        pos = torch.arange(n_prompt, device=device)
        # logits_to_keep=1: only the last position goes through the head (as model.generate)
        return model(input_ids=x, **{cache_kw: cache}, cache_position=pos, position_ids=pos[None],
                     use_cache=True, logits_to_keep=1).logits[:, -1]

    def step(tok, p):
        pos = torch.tensor([p], device=device)
        return step_model(input_ids=tok.view(1, 1), **{cache_kw: cache}, cache_position=pos,
                          position_ids=pos[None], use_cache=True).logits[:, -1]

    return prefill, step, "static-cache"


def _lean_engine(model, plan: DecoderPlan, n_prompt: int, max_new_tokens: int):
    """(prefill, step) on the lean forward (quantkit/runtime/lean_forward.py) and its KVCache."""
    device = model_device(model)
    state = {}

    def prefill(x):
        dtype = plan.embed(x[:, :1]).dtype  # the hidden dtype: cache and RoPE tables use it
        state["cache"] = KVCache.for_plan(plan, n_prompt + max_new_tokens, dtype, device)
        return lean_forward(plan, state["cache"], x, 0)

    def step(tok, p):
        return lean_forward(plan, state["cache"], tok.view(1, 1), p)

    return prefill, step, "lean"


def _run_loop(model, tokenizer, ids, max_new_tokens, temperature, top_p, seed, stream, ignore_eos, compile,
              engine) -> GenerateResult:
    """Prefill, then one step per token: sampling, streaming and the stop rules, whichever engine."""
    from quantkit.models.loading import quiet_transformers

    device = model_device(model)
    n_prompt = len(ids)
    stop = set() if ignore_eos else eos_ids(model, tokenizer)
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    text = TextStream(tokenizer) if tokenizer is not None else None
    out_ids: list = []
    model.eval()
    with quiet_transformers(), torch.inference_mode():
        prefill, step, name = engine()
        t0 = time.perf_counter()
        x = torch.tensor([ids], dtype=torch.long, device=device)
        tok = next_token(prefill(x), temperature, top_p, generator)
        t1 = time.perf_counter()
        stopped = "max_new_tokens"
        for i in range(max_new_tokens):
            tid = int(tok)
            out_ids.append(tid)
            if stream is not None and text is not None:
                piece = text.push(tid)
                if piece:
                    stream(piece)
            if tid in stop:
                stopped = "eos"
                break
            if i == max_new_tokens - 1:
                break
            tok = next_token(step(tok, n_prompt + i), temperature, top_p, generator)
        t2 = time.perf_counter()
    if stream is not None and text is not None:
        rest = text.flush()
        if rest:
            stream(rest)
    decoded = tokenizer.decode(out_ids, skip_special_tokens=True) if tokenizer is not None else ""
    return GenerateResult(ids=out_ids, text=decoded, prompt_tokens=n_prompt, new_tokens=len(out_ids),
                          prefill_seconds=t1 - t0, decode_seconds=t2 - t1, stopped=stopped,
                          runtime=name + (" + torch.compile" if compile else ""),
                          threads=torch.get_num_threads())
