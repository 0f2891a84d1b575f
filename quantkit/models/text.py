"""Text for calibration and evaluation: the shipped excerpts, or a user's file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Union

from quantkit.errors import UsageError

SPLITS = ("calib", "eval", "calib_large")
CALIB_SPLITS = ("calib", "calib_large")  # the shipped texts a pass may calibrate on (never "eval")


def default_text(split: str) -> str:
    """The shipped English text for ``split``: "calib" (120 KB calibration excerpt), "eval"
    (120 KB evaluation excerpt) or "calib_large" (1 MB calibration text, disjoint from "eval");
    see quantkit/data/README.md."""
    if split not in SPLITS:
        raise UsageError(f"unknown text split {split!r}; expected one of {', '.join(SPLITS)}")
    return resources.files("quantkit").joinpath("data").joinpath(f"{split}.txt").read_text(encoding="utf-8")


def read_text(path: Union[str, Path]) -> str:
    """Contents of a UTF-8 text file; UsageError naming ``path`` if missing, unreadable or empty."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"text file {p} does not exist")
    if not p.is_file():
        raise UsageError(f"text file {p} is not a regular file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UsageError(f"text file {p} cannot be read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"text file {p} is not valid UTF-8 (bad byte at offset {e.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise UsageError(f"text file {p} is empty")
    return text
