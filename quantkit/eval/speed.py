"""Greedy decode speed: tokens per second of ``model.generate`` on a fixed English prompt."""

from __future__ import annotations

import time
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
    tokens_per_s: float  # new_tokens / seconds
    new_tokens: int
    seconds: float       # wall time of the timed generate call (prompt prefill included)
    prompt_tokens: int


def decode_speed(model: nn.Module, tokenizer, prompt: str = DEFAULT_PROMPT, new_tokens: int = 128,
                 warmup: bool = True, prompt_ids: Optional[torch.Tensor] = None) -> SpeedResult:
    """Time one greedy ``generate`` of exactly ``new_tokens`` tokens (batch 1, KV cache on).

    A short untimed generate runs first when ``warmup``. Threads are whatever torch is set
    to (torch.set_num_threads). ``prompt_ids`` (1-D) replaces tokenizing ``prompt``.
    """
    from quantkit.models.loading import quiet_transformers

    if new_tokens < 1:
        raise UsageError(f"new_tokens must be at least 1, got {new_tokens}")
    if prompt_ids is None:
        if tokenizer is None:
            raise UsageError("decode_speed needs a tokenizer (or prompt_ids)")
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    else:
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(pad, (list, tuple)):
            pad = pad[0] if pad else None
    if pad is None:
        pad = 0

    def generate(n):
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=pad, temperature=None, top_p=None, top_k=None)

    model.eval()
    with quiet_transformers(), torch.inference_mode():
        if warmup:
            generate(min(4, new_tokens))
        t0 = time.perf_counter()
        out = generate(new_tokens)
        seconds = time.perf_counter() - t0
    produced = out.shape[1] - ids.shape[1]
    return SpeedResult(tokens_per_s=produced / seconds, new_tokens=produced, seconds=seconds,
                       prompt_tokens=ids.shape[1])
