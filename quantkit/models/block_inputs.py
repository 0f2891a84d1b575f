"""Calibration activations carried from one decoder block to the next.

Streaming compress holds one decoder block in memory at a time, so a calibrated pass
cannot run the whole model over its calibration windows. Instead the windows are embedded
once (``capture``: the model's own forward, stopped at the entry of the first decoder block,
which records the hidden states and the keyword arguments the block receives — rotary
position embeddings, causal mask, position ids), and each block then maps those hidden
states to the next block's (``BlockInputs.run``). Rows are run one at a time with the same
arguments as the whole-model forward, so a block sees bit-identical inputs either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at the first block."""


_CACHE_NAMES = ("past_key_values", "past_key_value", "cache")  # transformers 4.x / 5.x spellings


def replay_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments a decoder block received, made safe to call it again: without
    the hidden states and without any KV cache (whatever transformers names it: the cache
    object is shared by all calls, so a replayed row would attend to the rows before it),
    with ``use_cache=False``."""
    from transformers.cache_utils import Cache

    out = {k: v for k, v in kwargs.items()
           if k != "hidden_states" and k not in _CACHE_NAMES and not isinstance(v, Cache)}
    out["use_cache"] = False
    return out


@dataclass
class BlockInputs:
    """Inputs of the current decoder block for each calibration window.

    x: hidden states, [windows, tokens, hidden], the model's dtype.
    kwargs: keyword arguments every row passes to a block (same windows length, no padding,
        so one set serves all rows); the KV cache is dropped (``use_cache=False``).
    """

    x: torch.Tensor
    kwargs: dict[str, Any]

    @torch.no_grad()
    def run_row(self, block: nn.Module, i: int) -> torch.Tensor:
        """``block`` applied to row ``i`` of ``x`` alone (batch 1, as the whole-model forward
        of a calibrated pass runs it): that row of the next block's inputs, [tokens, hidden]."""
        out = block(self.x[i:i + 1], **self.kwargs)
        return (out[0] if isinstance(out, tuple) else out)[0]

    def run(self, block: nn.Module) -> torch.Tensor:
        """``block`` applied to every row of ``x``: the next block's inputs, same shape and dtype."""
        return torch.stack([self.run_row(block, i) for i in range(self.x.shape[0])])


@torch.no_grad()
def capture(model: nn.Module, first_block: nn.Module, ids: torch.Tensor) -> BlockInputs:
    """Run ``model`` on each row of ``ids`` (int64 [windows, tokens]) up to ``first_block``.

    Only the modules before the first block (embeddings, rotary tables) need real weights;
    the forward stops when the block is entered, so the later modules may be on meta.
    """
    seen: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen.append((hidden.detach(), dict(kwargs)))
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    run_kwargs = {"use_cache": False} if hasattr(model, "config") else {}  # no KV cache is built at all
    try:
        for row in ids:
            try:
                model(row[None], **run_kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(seen) != len(ids):
        raise RuntimeError("the model's forward did not reach its first decoder block")
    # each row starts without cache, as in the forward that made it
    return BlockInputs(torch.cat([h for h, _ in seen]), replay_kwargs(seen[0][1]))
