"""What the decode loop needs to know about a transformers model: its context, EOS ids,
device, and whether it can run on a static KV cache."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def context_length(model: nn.Module) -> Optional[int]:
    """The model's context (``max_position_embeddings`` of its text config), None if it names none."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if n else None


def eos_ids(model: nn.Module, tokenizer=None) -> set:
    """The ids that end generation: the generation config's eos_token_id (int or list), else the
    model config's, else the tokenizer's (the order ``model.generate`` uses)."""
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if eos is not None:
            return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
    return set()


def static_cache_unsupported(model: nn.Module) -> Optional[str]:
    """Why this model cannot run the static-cache loop (None when it can)."""
    if not getattr(model, "_can_compile_fullgraph", False):
        return f"{type(model).__name__} does not support a static KV cache in transformers"
    if getattr(model, "_is_stateful", False):
        return f"{type(model).__name__} is a stateful (recurrent) model"
    return None


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
