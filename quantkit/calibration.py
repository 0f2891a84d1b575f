"""Calibration data handed to calibrated passes (DB-LLM, BitStack, ...).

A ``CalibSource`` is the model's tokenizer plus a text; each pass asks it for as many
windows of token ids as its own config wants, so sample counts and lengths live in the
recipe, not here. The default text is the shipped English excerpt
(``quantkit/data/calib.txt``), disjoint from the evaluation excerpt; a pass whose config has
``default_calib_text`` (e.g. BitStack: "calib_large", 1 MB) reads that shipped text instead,
unless the user gave a text (``--calib-text``), which always wins (``CalibSource.for_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from quantkit.errors import UsageError


@dataclass(frozen=True)
class CalibSource:
    """A tokenizer and a text to cut calibration windows from.

    tokenizer: a Hugging Face tokenizer (anything with ``__call__(text)["input_ids"]``).
    text: the calibration text (str, UTF-8 prose).
    explicit: True when the user chose ``text`` (``--calib-text``); then a pass's own
        default text does not replace it.
    """

    tokenizer: Any
    text: str
    explicit: bool = False
    _ids: list = field(default_factory=list, repr=False, compare=False)  # cache: [tensor] once tokenized

    def token_ids(self) -> torch.Tensor:
        """The whole text tokenized once: int64 [T] (no special tokens added)."""
        if not self._ids:
            ids = self.tokenizer(self.text, add_special_tokens=False)["input_ids"]
            self._ids.append(torch.tensor(ids, dtype=torch.long))
        return self._ids[0]

    def for_config(self, config) -> "CalibSource":
        """The source a pass with ``config`` calibrates on: this one when the user chose the
        text or the config names no other default, else the shipped text
        ``config.default_calib_text`` names (quantkit.models.text.default_text)."""
        from quantkit.models.text import default_text

        name = default_text_name(config)
        if self.explicit or name == "calib":
            return self
        return CalibSource(self.tokenizer, default_text(name))

    def batches(self, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
        """``n_samples`` windows of ``seq_len`` consecutive tokens: int64 [n_samples, seq_len].

        Windows start at random offsets drawn with ``seed`` (same seed, same windows); when
        the text holds at least ``n_samples`` disjoint windows they are disjoint (drawn from
        the tiling of the text), otherwise they may overlap. Raises UsageError if the text
        is shorter than one window.
        """
        if n_samples < 1 or seq_len < 1:
            raise UsageError(f"calibration needs n_samples >= 1 and seq_len >= 1, got {n_samples} and {seq_len}")
        ids = self.token_ids()
        total = ids.numel()
        if total < seq_len:
            raise UsageError(f"calibration text has {total} tokens, fewer than one window of {seq_len}; "
                             "use a longer --calib-text or a smaller seq_len in the recipe")
        g = torch.Generator().manual_seed(seed)
        tiles = total // seq_len
        if tiles >= n_samples:
            # disjoint windows: pick n of the tiles, each shifted by a common random offset
            shift = int(torch.randint(0, total - tiles * seq_len + 1, (1,), generator=g))
            starts = torch.randperm(tiles, generator=g)[:n_samples] * seq_len + shift
        else:
            starts = torch.randint(0, total - seq_len + 1, (n_samples,), generator=g)
        return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def default_text_name(config) -> str:
    """The shipped text (a ``quantkit.models.text.default_text`` split) a pass with ``config``
    calibrates on when the user gives none: ``config.default_calib_text``, else "calib"."""
    return getattr(config, "default_calib_text", "calib")


def calib_source(model, text: Optional[str] = None) -> CalibSource:
    """The CalibSource for ``model``: its tokenizer (``model._quantkit_tokenizer``, set by
    ``quantkit.load_model``) and ``text`` (default: the shipped calibration excerpt, which a
    pass may swap for its own default: ``CalibSource.for_config``)."""
    from quantkit.models.text import default_text

    tokenizer = getattr(model, "_quantkit_tokenizer", None)
    if tokenizer is None:
        raise UsageError("this recipe has a calibrated pass, which needs the model's tokenizer: load the model "
                         "with quantkit.load_model (it attaches one), or set model._quantkit_tokenizer")
    if text is None:
        return CalibSource(tokenizer, default_text("calib"))
    return CalibSource(tokenizer, text, explicit=True)
