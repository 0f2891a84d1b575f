"""Progress bars on stderr: tqdm on a terminal, nothing when quiet or captured.

Bars go to stderr so that stdout stays machine-readable (tables, JSON).
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Optional, TypeVar

T = TypeVar("T")


def progress_bar(items: Iterable[T], desc: str = "", total: Optional[int] = None,
                 disable: bool = False, unit: str = "it") -> Iterable[T]:
    """Wrap ``items`` in a tqdm bar unless disabled, QUANTKIT_QUIET=1, or stderr is no TTY."""
    if disable or os.environ.get("QUANTKIT_QUIET") == "1" or not sys.stderr.isatty():
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
