"""Perplexity of a causal LM over a text, in non-overlapping windows.

The text is tokenized once (no special tokens added) and cut into non-overlapping windows of
``seq_len`` ids (quantkit/models/tokens.py); the ragged tail is dropped. A window starts with
the tokenizer's BOS when the tokenizer adds one by default (Gemma, Llama-2/3: ``[BOS]`` +
``seq_len - 1`` text tokens, all of them predicted), otherwise with text (SmolLM2:
``seq_len`` text tokens, all but the first predicted). Each window is scored on its own with
a no-grad forward pass, so a window contributes ``seq_len - 1`` predicted tokens either way.
The mean NLL is taken over all predicted tokens and ``ppl = exp(mean)``. With seq_len 512 and
max_tokens 8192 this scores 16 windows = 8176 predicted tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from quantkit.errors import UsageError
from quantkit.models.tokens import bos_convention, cut_windows, default_bos, text_tokens_per_window
from quantkit.progress import progress_bar


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float        # exp(nll_mean)
    nll_mean: float   # mean negative log-likelihood per predicted token (nats)
    n_tokens: int     # predicted tokens scored: n_windows * (seq_len - 1)
    n_windows: int
    seconds: float    # wall time of the forward passes (tokenization excluded)
    seq_len: int
    bos: Optional[int] = None  # the BOS id every window started with, or None (windows of text)

    @property
    def convention(self) -> str:
        """How the windows started, for printing next to the number."""
        return bos_convention(self.bos)


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
               token_ids: Optional[torch.Tensor] = None, bos: Union[int, None, str] = "auto") -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (or on pre-tokenized ``token_ids``, 1-D).

    max_tokens caps the text tokens read (None: the whole text); only whole windows are scored.
    bos: "auto" (default) starts every window with the tokenizer's BOS when it adds one by
    default (``quantkit.models.tokens.default_bos``; None without a tokenizer), an int starts
    them with that id, None never adds one.
    Raises UsageError if fewer text tokens than one window are available.
    """
    if seq_len < 2:
        raise UsageError(f"seq_len must be at least 2, got {seq_len}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and seq_len > max_pos:
        raise UsageError(f"seq_len {seq_len} is longer than the model's context ({max_pos} positions)")

    if token_ids is None:
        if text is None:
            raise UsageError("perplexity needs text or token_ids")
        ids = tokenize(tokenizer, text)
    else:
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if bos == "auto":
        bos = default_bos(tokenizer) if tokenizer is not None else None
    elif bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
        raise UsageError(f"bos must be 'auto', None or a token id, got {bos!r}")
    per_window = text_tokens_per_window(seq_len, bos)
    if max_tokens is not None and max_tokens < per_window:
        raise UsageError(f"max_tokens ({max_tokens}) is smaller than one window of seq_len {seq_len} "
                         f"({per_window} text tokens); not even one window fits")
    available = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    n_windows = available // per_window
    if n_windows == 0:
        raise UsageError(f"the text has only {ids.numel()} tokens; perplexity at seq_len {seq_len} needs at "
                         f"least {per_window} (use more text or a smaller --seq-len)")
    windows = cut_windows(ids, seq_len, bos, max_windows=n_windows)

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
                            seq_len=seq_len, bos=bos)
