"""Progress bars on stderr: tqdm on a terminal, nothing when quiet or captured
(``BlockProgress``, for streaming compress, prints plain lines when captured).

Bars go to stderr so that stdout stays machine-readable (tables, JSON).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Optional, TypeVar

T = TypeVar("T")


def progress_bar(items: Iterable[T], desc: str = "", total: Optional[int] = None,
                 disable: bool = False, unit: str = "it") -> Iterable[T]:
    """Wrap ``items`` in a tqdm bar unless disabled, QUANTKIT_QUIET=1, or stderr is no TTY."""
    if disable or os.environ.get("QUANTKIT_QUIET") == "1" or not sys.stderr.isatty():
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class stage:
    """``with stage("bitstack calibration", enabled=progress):`` prints one line on stderr when
    the step ends, with its wall time ("quantkit: bitstack calibration: 3m05s"), so a long
    job's log says where the time went; nothing when disabled or QUANTKIT_QUIET=1."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc = desc
        self.enabled = enabled and os.environ.get("QUANTKIT_QUIET") != "1"
        self.seconds = float("nan")

    def __enter__(self) -> "stage":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self.enabled and exc_type is None:
            print(f"quantkit: {self.desc}: {_duration(self.seconds)}", file=sys.stderr, flush=True)


class BlockProgress:
    """Progress over the units of a streaming compress, with an ETA.

    A tqdm bar on a terminal; on any other stderr (a log file, CI) one plain line per
    finished unit; nothing with ``enabled=False`` or QUANTKIT_QUIET=1. ``done`` units
    (resumed) count toward the position but not toward the speed used for the ETA.
    """

    def __init__(self, total: int, done: int = 0, desc: str = "compress", enabled: bool = True):
        self.total, self.done, self._first = total, done, done
        self.quiet = not enabled or os.environ.get("QUANTKIT_QUIET") == "1"
        self._t0 = time.perf_counter()
        self._bar = None
        if not self.quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=done, desc=desc, unit="block", file=sys.stderr,
                             dynamic_ncols=True, leave=False)

    def eta(self) -> float:
        elapsed = time.perf_counter() - self._t0
        finished = self.done - self._first
        return elapsed / finished * (self.total - self.done) if finished else float("nan")

    def update(self, name: str) -> None:
        self.done += 1
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(name, refresh=False)
            self._bar.update(1)
            return
        elapsed = time.perf_counter() - self._t0
        print(f"quantkit: [{self.done}/{self.total}] {name} done ({_duration(elapsed)} elapsed, "
              f"ETA {_duration(self.eta())})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
