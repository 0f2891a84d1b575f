"""Small helpers shared by the benchmark/report scripts in tools/ (run as `python tools/X.py`)."""

from __future__ import annotations

import platform
from typing import Optional


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
