"""Keeping a long streaming compress's resident memory flat (glibc's allocator knobs).

Both functions do nothing where the C library is not glibc (macOS, Windows, musl). The
numbers behind them are in docs/benchmarks.md ("Peak memory vs number of blocks").
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
DEFAULT_MMAP_THRESHOLD = 4 << 20  # 4 MiB
THRESHOLD_ENV = "QUANTKIT_MMAP_THRESHOLD"

_libc = None  # ctypes handle, looked up on first use (False where there is none)


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(None)
            lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _libc = lib
        except (OSError, AttributeError):  # not glibc
            _libc = False
    return _libc


def return_freed_memory() -> None:
    """Give the pages of freed heap memory back to the kernel (glibc ``malloc_trim(0)``).

    Why, measured (docs/benchmarks.md, "Peak memory vs number of blocks"): after a unit is
    written and put back on meta, none of its tensors is alive (the live CPU tensors and
    their bytes are the same after every block, tests/cli/test_streaming_memory.py), yet
    without this the anonymous memory left after each 206 MB fp32 block grew by ~35 MiB, and
    nf4's peak RssAnon went from 0.62 GiB (6 blocks) to 0.98-1.60 GiB (24 blocks). It is
    free glibc heap, not live objects: mallinfo2's bytes in use stay at ~119 MiB while its
    free bytes grow unit after unit. The quantizers' temporaries are 1-32 MiB; glibc serves
    those from the heap once its dynamic mmap threshold has risen (after the first large
    free, up to 32 MiB), and freed heap pages stay resident: the heap only shrinks from its
    top, and as it fragments each unit's allocations land on pages no earlier unit touched.
    ``malloc_trim(0)`` releases the free pages anywhere in the heaps (madvise), so every unit
    starts from the same resident heap (~257 MiB after each unit of the 24-block model). It
    takes milliseconds per unit. What it cannot undo is fragmentation: small long-lived
    allocations landing between the freed temporaries pin their pages, so the peak of a
    24-block run could still creep (0.59-0.71 GiB against 0.48-0.57 GiB at 6 blocks);
    ``use_mmap_for_large_allocations`` below removes that for the CLI.
    """
    lib = _glibc()
    if lib:
        lib.malloc_trim(0)


def use_mmap_for_large_allocations(threshold: int | None = None) -> int:
    """Serve every allocation of ``threshold`` bytes or more (default 4 MiB, or
    $QUANTKIT_MMAP_THRESHOLD; 0 = leave glibc's default) with its own mmap, returned to the
    kernel when freed. Returns the threshold set (0 if none).

    Why: glibc's threshold is dynamic; after the first large free it rises to 32 MiB, and
    the quantizers' 1-32 MiB temporaries then come from the heap, which fragments as units
    come and go. With a fixed 4 MiB threshold they never enter the heap, and peak RssAnon of
    nf4 streaming compress (206 MB fp32 blocks, --max-shard-size 200MB) was 0.395 GiB at 6
    blocks and 0.402 GiB at 24 (+0.5 % per added GiB of model), against 0.48-0.59 and
    0.59-0.71 GiB with ``return_freed_memory`` alone. Cost: every large temporary is a fresh
    mapping whose pages fault in zeroed, ~1.4x the wall time of that nf4 compress (51 s
    instead of 36 s at 24 blocks; calibrated passes, dominated by compute, pay less).

    It changes the allocator of the whole process for good and works only when set before
    the large allocations it is meant to steer (a heap already holding large free chunks
    keeps reusing them: building the meta skeleton allocates and frees every parameter on
    the CPU), so ``quantkit compress`` calls it first thing; a library caller who wants it
    calls it at program start.
    """
    if threshold is None:
        raw = os.environ.get(THRESHOLD_ENV, "").strip()
        threshold = int(raw) if raw else DEFAULT_MMAP_THRESHOLD
    if threshold <= 0:
        return 0
    lib = _glibc()
    if not lib or not lib.mallopt(M_MMAP_THRESHOLD, int(threshold)):
        return 0
    return int(threshold)
