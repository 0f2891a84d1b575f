"""``model.generate`` for architectures the static-cache loop cannot run, with the same
result type, streaming and timing split (prefill = until the first new token)."""

from __future__ import annotations

import time

import torch

from quantkit.runtime.model_info import eos_ids, model_device
from quantkit.runtime.result import GenerateResult
from quantkit.runtime.text_stream import TextStream


class _Streamer:
    """transformers' streamer protocol (put/end): timestamps the first new token, streams text."""

    def __init__(self, tokenizer, stream):
        self.text = TextStream(tokenizer) if tokenizer is not None and stream is not None else None
        self.stream = stream
        self.calls = 0
        self.first_token_at = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 1:  # the first put is the prompt itself
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.text is not None:
            for tid in value.reshape(-1).tolist():
                piece = self.text.push(tid)
                if piece:
                    self.stream(piece)

    def end(self) -> None:
        if self.text is not None:
            rest = self.text.flush()
            if rest:
                self.stream(rest)


def hf_generate(model, tokenizer, ids, max_new_tokens, temperature, top_p, seed, stream, ignore_eos, reason,
                cache_implementation=None):
    """``model.generate`` on ``ids`` (list of ints), timed like the static loop. reason: why the
    fallback runs (kept in the result). cache_implementation: passed through ("static" times
    transformers' generate on the same kind of cache as ours; None = its default)."""
    from quantkit.models.loading import quiet_transformers

    device = model_device(model)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    eos = sorted(eos_ids(model, tokenizer))
    pad = eos[0] if eos else 0
    sample = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None} if temperature > 0 \
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    streamer = _Streamer(tokenizer, stream)
    torch.manual_seed(seed)  # model.generate samples from the global generator
    model.eval()
    with quiet_transformers(), torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens if ignore_eos else None, pad_token_id=pad,
                             streamer=streamer, cache_implementation=cache_implementation, **sample)
        t2 = time.perf_counter()
    new = out[0, len(ids):].tolist()
    t1 = streamer.first_token_at or t2
    stopped = "eos" if new and new[-1] in eos and not ignore_eos else "max_new_tokens"
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else ""
    return GenerateResult(ids=new, text=text, prompt_tokens=len(ids), new_tokens=len(new), prefill_seconds=t1 - t0,
                          decode_seconds=t2 - t1, stopped=stopped,
                          runtime="model.generate" + (f" ({cache_implementation} cache)" if cache_implementation
                                                      else ""),
                          threads=torch.get_num_threads(), fallback_reason=reason)
