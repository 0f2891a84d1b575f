"""Calibration data handed to calibrated passes (DB-LLM, BitStack, ...).

A ``CalibSource`` is the model's tokenizer plus a text (or a stream of token ids the caller
tokenized); each pass asks it for as many windows of token ids as its own config wants, so
sample counts and lengths live in the recipe, not here. The default text is the shipped
English excerpt (``quantkit/data/calib.txt``), disjoint from the evaluation excerpt; a pass
whose config has ``default_calib_text`` (e.g. BitStack: "calib_large", 1 MB) reads that
shipped text instead, unless the user gave data (``--calib-text``, ``compress(calib=...)``),
which always wins (``CalibSource.for_config``).

Windows start as the model sees text in use: with the tokenizer's BOS when it adds one by
default (Gemma, Llama-2/3), with text otherwise (SmolLM2); see quantkit/models/tokens.py.

``calib_source(model, tokenizer=..., calib=...)`` turns what a caller has into a source:
a text, a list of texts, a ``datasets.Dataset`` with a text column, or int64 token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from quantkit.errors import UsageError


@dataclass(frozen=True)
class CalibSource:
    """A tokenizer and a text to cut calibration windows from.

    tokenizer: a Hugging Face tokenizer (anything with ``__call__(text)["input_ids"]``); may
        be None when ``ids`` are given (then no BOS is added).
    text: the calibration text (str, UTF-8 prose), or None when ``ids`` are given.
    explicit: True when the user chose the data (``--calib-text``, ``calib=``); then a pass's
        own default text does not replace it.
    ids: a token stream the caller tokenized, int64 [T]; used instead of ``text``.
    """

    tokenizer: Any
    text: Optional[str]
    explicit: bool = False
    ids: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    _ids: list = field(default_factory=list, repr=False, compare=False)  # cache: [tensor] once tokenized

    def token_ids(self) -> torch.Tensor:
        """The whole stream: ``ids``, or the text tokenized once (no special tokens): int64 [T]."""
        if self.ids is not None:
            return self.ids
        if not self._ids:
            ids = self.tokenizer(self.text, add_special_tokens=False)["input_ids"]
            self._ids.append(torch.tensor(ids, dtype=torch.long))
        return self._ids[0]

    def bos(self) -> Optional[int]:
        """The id every window starts with (the tokenizer's default BOS), or None."""
        from quantkit.models.tokens import default_bos

        return default_bos(self.tokenizer) if self.tokenizer is not None else None

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
        """``n_samples`` windows of ``seq_len`` token ids: int64 [n_samples, seq_len].

        Each window is ``seq_len`` consecutive tokens of the text, or, when the tokenizer adds
        a BOS by default, that BOS followed by ``seq_len - 1`` consecutive tokens. Windows
        start at random offsets drawn with ``seed`` (same seed, same windows); when the text
        holds at least ``n_samples`` disjoint windows they are disjoint (drawn from the
        tiling of the text), otherwise they may overlap. Raises UsageError if the text is
        shorter than one window.
        """
        if n_samples < 1 or seq_len < 1 or (seq_len < 2 and self.bos() is not None):
            raise UsageError(f"calibration needs n_samples >= 1 and seq_len >= 1 (2 with a BOS), got {n_samples} "
                             f"and {seq_len}")
        ids = self.token_ids()
        bos = self.bos()
        span = seq_len - 1 if bos is not None else seq_len  # text tokens per window
        total = ids.numel()
        if total < span:
            raise UsageError(f"calibration text has {total} tokens, fewer than one window of {span}; "
                             "use a longer --calib-text or a smaller seq_len in the recipe")
        g = torch.Generator().manual_seed(seed)
        tiles = total // span
        if tiles >= n_samples:
            # disjoint windows: pick n of the tiles, each shifted by a common random offset
            shift = int(torch.randint(0, total - tiles * span + 1, (1,), generator=g))
            starts = torch.randperm(tiles, generator=g)[:n_samples] * span + shift
        else:
            starts = torch.randint(0, total - span + 1, (n_samples,), generator=g)
        windows = torch.stack([ids[s:s + span] for s in starts.tolist()])
        if bos is None:
            return windows
        return torch.cat([torch.full((n_samples, 1), bos, dtype=windows.dtype), windows], dim=1)


def default_text_name(config) -> str:
    """The shipped text (a ``quantkit.models.text.default_text`` split) a pass with ``config``
    calibrates on when the user gives none: ``config.default_calib_text``, else "calib"."""
    return getattr(config, "default_calib_text", "calib")


TEXT_COLUMN = "text"


def calib_source(model, text: Optional[str] = None, *, tokenizer=None, calib: Any = None) -> CalibSource:
    """The CalibSource for ``model``.

    tokenizer: the model's tokenizer; default ``model._quantkit_tokenizer`` (which
        ``quantkit.load_model`` attaches).
    calib: what to calibrate on; None: the shipped excerpt (a pass may swap it for its own
        default: ``CalibSource.for_config``). Accepted:
          - a str: one text;
          - a list/tuple of str: texts, joined with blank lines;
          - a ``datasets.Dataset`` (or anything with ``column_names`` and column access):
            its "text" column, or its only string column;
          - an integer tensor of token ids, [T] or [N, L] (rows are read in order as one
            stream); windows get no BOS unless a tokenizer that adds one is known.
    text: the older spelling of ``calib`` for a single text (``--calib-text``).
    Raises UsageError for data of another kind, empty data, or no tokenizer for text.
    """
    from quantkit.models.text import default_text

    if text is not None and calib is not None:
        raise UsageError("give the calibration data once: calib= (calib_text= is its older spelling for one text)")
    calib = text if calib is None else calib
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "_quantkit_tokenizer", None)
    if isinstance(calib, torch.Tensor):
        return CalibSource(tokenizer, None, explicit=True, ids=_token_stream(calib))
    if tokenizer is None:
        raise UsageError("this recipe has a calibrated pass, which tokenizes its calibration text with the model's "
                         "tokenizer, and none is known: pass tokenizer=AutoTokenizer.from_pretrained(...) to "
                         "quantkit.compress (or calib= as a LongTensor of token ids), or load the model with "
                         "quantkit.load_model, which attaches its tokenizer")
    if calib is None:
        return CalibSource(tokenizer, default_text("calib"))
    return CalibSource(tokenizer, _calib_text(calib), explicit=True)


def _token_stream(ids: torch.Tensor) -> torch.Tensor:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise UsageError(f"calib token ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() not in (1, 2):
        raise UsageError(f"calib token ids must be [T] or [N, L], got shape {list(ids.shape)}")
    if ids.numel() == 0:
        raise UsageError("calib token ids are empty")
    if int(ids.min()) < 0:
        raise UsageError(f"calib token ids must be >= 0, got {int(ids.min())}")
    return ids.detach().reshape(-1).to(torch.long).cpu()


def _calib_text(calib: Any) -> str:
    """One text from a str, a list/tuple of str, or a dataset's text column."""
    if isinstance(calib, str):
        texts = [calib]
    elif isinstance(calib, (list, tuple)):
        bad = next((type(t).__name__ for t in calib if not isinstance(t, str)), None)
        if bad is not None:
            raise UsageError(f"calib as a list must hold only str texts, found a {bad}")
        texts = list(calib)
    elif hasattr(calib, "column_names"):
        texts = _dataset_texts(calib)
    else:
        raise UsageError(f"calib must be a str, a list of str, a datasets.Dataset with a {TEXT_COLUMN!r} column, or "
                         f"a LongTensor of token ids; got {type(calib).__name__}")
    joined = "\n\n".join(t for t in texts if t.strip())
    if not joined.strip():
        raise UsageError("calib holds no text (empty or whitespace only)")
    return joined


def _dataset_texts(ds: Any) -> list:
    columns = list(ds.column_names)
    if TEXT_COLUMN in columns:
        column = TEXT_COLUMN
    else:
        features = getattr(ds, "features", None) or {}
        strings = [c for c in columns if getattr(features.get(c), "dtype", None) in ("string", "large_string")]
        if len(strings) != 1:
            raise UsageError(f"calib dataset has no {TEXT_COLUMN!r} column and {len(strings)} string columns to "
                             f"choose from (columns: {', '.join(columns) or 'none'}); select one, e.g. "
                             f"ds.rename_column(NAME, {TEXT_COLUMN!r})")
        column = strings[0]
    texts = list(ds[column])
    bad = next((type(t).__name__ for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise UsageError(f"calib dataset column {column!r} must hold str texts, found a {bad}")
    return texts
