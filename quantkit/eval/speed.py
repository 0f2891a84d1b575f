"""Greedy decode speed: tokens per second of quantkit's runtime (quantkit/runtime) on a fixed
English prompt, the same loop `quantkit generate` runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from quantkit.errors import UsageError

DEFAULT_PROMPT = ("The Python standard library is very extensive, offering a wide range of facilities. "
                  "In this short overview we describe the modules that are most useful in everyday work, "
                  "starting with")


@dataclass(frozen=True)
class SpeedResult:
    tokens_per_s: float  # decode: (new_tokens - 1) one-token steps / their seconds (new_tokens / seconds if 1)
    new_tokens: int
    seconds: float       # wall time of the timed run, prefill included
    prompt_tokens: int
    prefill_tokens_per_s: float = float("nan")  # prompt_tokens / the prompt forward's seconds


def decode_speed(model: nn.Module, tokenizer, prompt: str = DEFAULT_PROMPT, new_tokens: int = 128,
                 warmup: bool = True, prompt_ids: Optional[torch.Tensor] = None) -> SpeedResult:
    """Time one greedy ``quantkit.runtime.generate`` of exactly ``new_tokens`` tokens (batch 1,
    static KV cache, EOS ignored).

    A short untimed run first when ``warmup``. Threads are whatever torch is set to
    (torch.set_num_threads). ``prompt_ids`` (1-D) replaces tokenizing ``prompt``.
    """
    from quantkit.runtime.generate import generate

    if new_tokens < 1:
        raise UsageError(f"new_tokens must be at least 1, got {new_tokens}")
    if prompt_ids is None:
        if tokenizer is None:
            raise UsageError("decode_speed needs a tokenizer (or prompt_ids)")
        ids = tokenizer(prompt)["input_ids"]
    else:
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).tolist()
    if warmup:
        generate(model, tokenizer, prompt_ids=ids, max_new_tokens=min(4, new_tokens), ignore_eos=True)
    r = generate(model, tokenizer, prompt_ids=ids, max_new_tokens=new_tokens, ignore_eos=True)
    seconds = r.prefill_seconds + r.decode_seconds
    tps = r.decode_tokens_per_s if r.new_tokens > 1 else r.new_tokens / seconds
    return SpeedResult(tokens_per_s=tps, new_tokens=r.new_tokens, seconds=seconds, prompt_tokens=r.prompt_tokens,
                       prefill_tokens_per_s=r.prompt_tokens_per_s)
