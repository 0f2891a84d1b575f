"""Choosing the next token from one row of logits: greedy argmax, or temperature + top-p sampling."""

from __future__ import annotations

from typing import Optional

import torch

from quantkit.errors import UsageError


def check_sampling(temperature: float, top_p: float) -> None:
    """UsageError for a temperature < 0 or a top_p outside (0, 1]."""
    if not temperature >= 0:  # also catches NaN
        raise UsageError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The next token id for each row.

    logits: [batch, vocab] (any float dtype). temperature 0 -> argmax (ties: lowest id, as
    ``model.generate``); otherwise softmax(logits / temperature) restricted to the smallest
    set of tokens whose probability reaches ``top_p`` (the most likely token is always kept),
    sampled with ``generator`` so a seed reproduces the draw. Returns int64 [batch].
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    # fp32 for the softmax: a bf16 model's logits would round small probabilities to 0
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (so the first is always kept)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        pick = torch.multinomial(sorted_p, 1, generator=generator)
        return order.gather(-1, pick).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
