"""Small helpers shared by the benchmark/report scripts in tools/ (run as `python tools/X.py`)."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Optional


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def emit(table: str, markdown: Optional[str]) -> None:
    """Print ``table`` and, if ``markdown`` names a file, append it there."""
    print(table)
    if markdown:
        with open(markdown, "a") as f:
            f.write(table + "\n")


def bench(fn: Callable[[], object], min_reps: int = 20, budget_s: float = 1.0, max_reps: int = 2000) -> float:
    """Median seconds per call of ``fn``: 3 warm-up calls, then single timed calls until at
    least ``min_reps`` were taken and ``budget_s`` seconds have passed (at most ``max_reps``)."""
    for _ in range(3):
        fn()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
