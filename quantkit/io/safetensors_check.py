"""Validate a .safetensors file from its header alone, before anything loads it.

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON (an object mapping tensor
names to {"dtype", "shape", "data_offsets": [begin, end]} plus an optional "__metadata__"
object of strings), then the data section; offsets are relative to the data section.

The checks mirror what the safetensors library itself enforces when it opens a file
(tensors tile the data section exactly: no overlaps, no gaps, no trailing bytes), but
every failure is a CheckpointError whose message names the file and the offending entry,
instead of a bare library error halfway through a load. No tensor data is read, and the
header is capped so a hostile length field cannot make us allocate without bound.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Union

from quantkit.errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # same cap as the safetensors library

# bits per element of every dtype the safetensors format defines
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_safetensors(path: Union[str, Path]) -> dict:
    """Check the header of ``path`` and return it parsed (tensor entries and ``__metadata__``).

    Raises CheckpointError naming ``path`` if the file is missing, too short, has a header
    that is oversized, not UTF-8 JSON or malformed, an unknown dtype, a bad shape, bad or
    overlapping data_offsets, a byte size that does not match the shape, or a data section
    that is truncated (or longer than its tensors).
    """
    path = Path(path)
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is not a safetensors file: {size} bytes, shorter than the "
                                      f"8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path} is corrupt: header length {n} exceeds the "
                                      f"{MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise CheckpointError(f"{path} is corrupt or truncated: header length {n} is larger than "
                                      f"the {size - 8} bytes after the length field")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from None
    if len(raw) != n:
        raise CheckpointError(f"{path} is truncated: header ends after {len(raw)} of {n} bytes")
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is corrupt: header is not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt: header is not valid JSON ({e.msg} at char {e.pos})") from None
    except RecursionError:
        raise CheckpointError(f"{path} is corrupt: header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: header is a JSON {type(header).__name__}, not an object")

    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path} is corrupt: __metadata__ must be an object of strings")

    data_len = size - 8 - n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} has a header entry that is not an object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise CheckpointError(f"{where} lacks {', '.join(missing)} in the header")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise CheckpointError(f"{where} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where} has shape {shape!r}; expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise CheckpointError(f"{where} has data_offsets {offsets!r}; expected [begin, end]")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise CheckpointError(f"{where} has data_offsets {offsets!r}; expected 0 <= begin <= end")
        numel = 1
        for d in shape:
            numel *= d
        nbits = numel * DTYPE_BITS[dtype]
        if nbits % 8 or end - begin != nbits // 8:
            raise CheckpointError(f"{where} has {end - begin} bytes at data_offsets {offsets!r}, but shape "
                                  f"{shape} of {dtype} needs {nbits / 8:g}")
        spans.append((begin, end, name))

    spans.sort()
    largest = max((e for _, e, _ in spans), default=0)
    if largest > data_len:
        raise CheckpointError(f"{path} is truncated: its tensors need {largest} bytes of data but the file "
                              f"holds {data_len} after the header")
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin < pos:
            raise CheckpointError(f"{path} is corrupt: tensors {prev!r} and {name!r} overlap "
                                  f"(bytes {begin}..{pos})")
        if begin > pos:
            raise CheckpointError(f"{path} is corrupt: {begin - pos} unused bytes before tensor {name!r}")
        pos, prev = end, name
    if pos != data_len:
        raise CheckpointError(f"{path} is corrupt: {data_len - pos} bytes after the last tensor's data")
    return header
