"""Where a window of token ids starts: with the tokenizer's BOS token, or not.

Models trained with a BOS token at the start of every sequence (Gemma, Llama-2/3) see one in
use: their tokenizers add it by default (``tokenizer(text)`` starts with it). Scoring or
calibrating such a model on windows without it measures something the model never sees:
Gemma-3-270M (Q4_K_M GGUF) scores 49.5 on the shipped eval text without BOS and 20.7 with it
(llama.cpp: 50.4 / 20.7 on the same windows; docs/benchmarks.md). Models
whose tokenizer adds nothing (SmolLM2, GPT-2 style) get windows of plain text.

Both perplexity (quantkit/eval/perplexity.py) and calibration (quantkit/calibration.py) cut
windows here, so the two follow one convention:
    no BOS:   windows of ``seq_len`` text tokens; ``seq_len - 1`` of them are predicted
    with BOS: ``[BOS] + (seq_len - 1)`` text tokens; every text token is predicted
Either way a window holds ``seq_len`` ids and ``seq_len - 1`` predicted tokens.
"""

from __future__ import annotations

from typing import Optional

import torch


def default_bos(tokenizer) -> Optional[int]:
    """The BOS token id ``tokenizer`` puts at the start of a text by default, or None if it
    adds none (decided by encoding a probe text with and without special tokens, so it
    follows the tokenizer's own ``add_bos_token`` / post-processor setting)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe = "Hello"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    if len(with_special) > len(plain) and with_special[0] == bos and with_special[1:1 + len(plain)] == plain:
        return int(bos)
    return None


def bos_convention(bos: Optional[int]) -> str:
    """One line for results: how the windows started."""
    return f"windows start with BOS (id {bos})" if bos is not None else "windows start with text (no BOS)"


def cut_windows(ids: torch.Tensor, seq_len: int, bos: Optional[int], max_windows: Optional[int] = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``ids`` (int64 [T]) as int64 [n, seq_len].

    bos None: each window is ``seq_len`` text tokens. bos an id: each window is that id then
    ``seq_len - 1`` text tokens. The ragged tail is dropped; ``max_windows`` caps n.
    """
    text_len = seq_len - 1 if bos is not None else seq_len
    n = ids.numel() // text_len
    if max_windows is not None:
        n = min(n, max_windows)
    body = ids[: n * text_len].view(n, text_len)
    if bos is None:
        return body
    return torch.cat([torch.full((n, 1), bos, dtype=body.dtype), body], dim=1)


def text_tokens_per_window(seq_len: int, bos: Optional[int]) -> int:
    """How many text tokens one window consumes (``seq_len`` or ``seq_len - 1``)."""
    return seq_len - 1 if bos is not None else seq_len
