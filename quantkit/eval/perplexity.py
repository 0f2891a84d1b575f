"""Perplexity of a causal LM over a text, in non-overlapping windows.

The text is tokenized once (no special tokens added) and cut into windows of ``seq_len``
tokens; the ragged tail is dropped. Each window is scored on its own with a no-grad forward
pass: every token but the first of a window is predicted from the tokens before it in that
window, so a window contributes ``seq_len - 1`` predicted tokens. The mean NLL is taken over
all predicted tokens and ``ppl = exp(mean)``. With seq_len 512 and max_tokens 8192 this
scores 16 windows = 8176 predicted tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from quantkit.errors import UsageError
from quantkit.progress import progress_bar


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float        # exp(nll_mean)
    nll_mean: float   # mean negative log-likelihood per predicted token (nats)
    n_tokens: int     # predicted tokens scored: n_windows * (seq_len - 1)
    n_windows: int
    seconds: float    # wall time of the forward passes (tokenization excluded)
    seq_len: int


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as a 1-D int64 tensor (no BOS/EOS added)."""
    if tokenizer is None:
        raise UsageError("perplexity needs a tokenizer (or token_ids)")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def perplexity(model: nn.Module, tokenizer, text: Optional[str] = None, seq_len: int = 512,
               max_tokens: Optional[int] = 8192, progress: bool = True, batch_size: int = 1,
               token_ids: Optional[torch.Tensor] = None) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (or on pre-tokenized ``token_ids``, 1-D).

    max_tokens caps the tokens read (None: the whole text); only whole windows are scored.
    Raises UsageError if fewer than ``seq_len`` tokens are available.
    """
    if seq_len < 2:
        raise UsageError(f"seq_len must be at least 2, got {seq_len}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < seq_len:
        raise UsageError(f"max_tokens ({max_tokens}) is smaller than seq_len ({seq_len}); "
                         f"not even one window fits")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and seq_len > max_pos:
        raise UsageError(f"seq_len {seq_len} is longer than the model's context ({max_pos} positions)")

    if token_ids is None:
        if text is None:
            raise UsageError("perplexity needs text or token_ids")
        ids = tokenize(tokenizer, text)
    else:
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    available = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    n_windows = available // seq_len
    if n_windows == 0:
        raise UsageError(f"the text has only {ids.numel()} tokens; perplexity at seq_len {seq_len} needs at "
                         f"least {seq_len} (use more text or a smaller --seq-len)")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)

    device = _model_device(model)
    was_training = model.training
    model.eval()
    nll_sum, n_pred = 0.0, 0
    starts = range(0, n_windows, batch_size)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for start in progress_bar(starts, desc=f"perplexity (seq {seq_len})", total=len(starts),
                                      disable=not progress, unit="batch"):
                batch = windows[start:start + batch_size].to(device)
                out = model(input_ids=batch, labels=batch, use_cache=False)
                # HF's loss is the mean over the batch's predicted tokens, all windows equal length
                count = batch.shape[0] * (seq_len - 1)
                nll_sum += float(out.loss.double()) * count
                n_pred += count
                del out
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    mean = nll_sum / n_pred
    ppl = math.exp(mean) if mean < 700 else float("inf")
    return PerplexityResult(ppl=ppl, nll_mean=mean, n_tokens=n_pred, n_windows=n_windows, seconds=seconds,
                            seq_len=seq_len)
