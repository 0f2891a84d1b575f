"""Sharded safetensors: a streaming writer, shard planning, and the index file.

The writer computes the header from names, dtypes and shapes alone, then writes tensor
bytes one tensor at a time, either from a tensor in memory or copied (in 16 MiB pieces)
from another safetensors file, so writing a shard never holds more than one tensor in
memory whatever the shard size. Files are what the safetensors library reads: 8-byte
little-endian header length, compact JSON header (``__metadata__`` first), padded with
spaces to a multiple of 8, then the tensors tightly packed in header order. Within a
file tensors are ordered by element size (largest first), then name, as the safetensors
library orders them, so every tensor starts at a multiple of its element size.

A model too large for one file is split into ``model-00001-of-0000N.safetensors`` …
(consecutive tensors, each file at most ``max_shard_bytes`` unless one tensor is larger)
plus ``model.safetensors.index.json``: ``{"metadata": {"total_size": …}, "weight_map":
{tensor: file}}``, the layout transformers writes. A model that fits writes only
``model.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from quantkit.errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2_000_000_000  # 2 GB: small enough for any filesystem and HTTP upload
_COPY_CHUNK = 16 << 20

# torch dtype <-> safetensors dtype name (those a torch tensor can hold)
TORCH_TO_ST = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16",
    torch.int32: "I32", torch.uint32: "U32", torch.int64: "I64", torch.uint64: "U64",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}
_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for dt, name in TORCH_TO_ST.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: its header fields and where its bytes come from.

    source: a CPU ``torch.Tensor``, or ``(path, offset)``: ``nbytes`` bytes at absolute
    ``offset`` of an existing file.
    """

    name: str
    dtype: str
    shape: tuple
    nbytes: int
    source: object

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE.get(self.dtype, 1)


def entry_from_tensor(name: str, tensor: torch.Tensor) -> TensorEntry:
    t = tensor.detach()
    if t.dtype not in TORCH_TO_ST:
        raise ValueError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
    t = t.cpu().contiguous()
    return TensorEntry(name, TORCH_TO_ST[t.dtype], tuple(t.shape), t.numel() * t.element_size(), t)


def entries_from_file(path: Union[str, Path], header: Optional[dict] = None) -> list[TensorEntry]:
    """Entries that copy every tensor of an existing (validated) safetensors file, in file order."""
    from quantkit.io.safetensors_check import validate_safetensors

    path = Path(path)
    if header is None:
        header = validate_safetensors(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    items = sorted(((v["data_offsets"][0], k, v) for k, v in header.items() if k != "__metadata__"),
                   key=lambda x: x[0])
    return [TensorEntry(k, v["dtype"], tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0],
                        (path, 8 + n + begin)) for begin, k, v in items]


def file_order(entries: Iterable[TensorEntry]) -> list[TensorEntry]:
    """The order tensors take inside one file: element size descending, then name."""
    return sorted(entries, key=lambda e: (-e.itemsize, e.name))


def header_bytes(entries: list[TensorEntry], metadata: Optional[dict]) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    for e in entries:
        if e.name == "__metadata__" or e.name in header:
            raise ValueError(f"duplicate or reserved tensor name {e.name!r}")
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file's bytes (read in 16 MB chunks): what ``write_safetensors`` returns."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_safetensors(path: Union[str, Path], entries: list[TensorEntry], metadata: Optional[dict] = None) -> str:
    """Write ``entries`` (in ``file_order``) to ``path``, fsync it; returns the file's sha256."""
    entries = file_order(entries)
    raw = header_bytes(entries, metadata)
    digest = hashlib.sha256()
    sources: dict = {}

    def emit(f, data) -> None:
        f.write(data)
        digest.update(data)

    try:
        with open(path, "wb") as f:
            emit(f, struct.pack("<Q", len(raw)))
            emit(f, raw)
            for e in entries:
                if not e.nbytes:
                    continue
                if isinstance(e.source, torch.Tensor):
                    emit(f, memoryview(e.source.reshape(-1).view(torch.uint8).numpy()))
                    continue
                src_path, offset = e.source
                if src_path not in sources:
                    sources[src_path] = open(src_path, "rb")
                src = sources[src_path]
                src.seek(offset)
                left = e.nbytes
                while left:
                    chunk = src.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise CheckpointError(f"{src_path} ended while copying tensor {e.name}")
                    emit(f, chunk)
                    left -= len(chunk)
            f.flush()
            os.fsync(f.fileno())
    finally:
        for s in sources.values():
            s.close()
    return digest.hexdigest()


def plan_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Split ``entries`` (kept in order) into consecutive groups of at most ``max_shard_bytes``."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [WEIGHTS_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_sharded(folder: Union[str, Path], entries: list[TensorEntry], metadata: dict,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, index_metadata: Optional[dict] = None) -> list[str]:
    """Write ``entries`` into ``folder`` as one file or shards + index; returns the file names."""
    folder = Path(folder)
    groups = plan_shards(list(entries), max_shard_bytes)
    names = shard_names(len(groups))
    weight_map = {}
    for name, group in zip(names, groups):
        write_safetensors(folder / name, group, metadata)
        weight_map.update({e.name: name for e in group})
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries), **(index_metadata or {})},
                 "weight_map": weight_map}
        write_json(folder / INDEX_NAME, index)
    return names


def fsync_dir(folder: Union[str, Path]) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Union[str, Path], obj) -> None:
    """Write JSON through a temporary file + fsync + rename (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_index(folder: Union[str, Path]) -> tuple[dict, list[Path]]:
    """(weight_map, shard paths in name order) of ``folder/model.safetensors.index.json``.

    Raises CheckpointError if the index is not JSON with a weight_map object of strings,
    names a file outside the folder, or a listed shard is missing.
    """
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RecursionError):
        raise CheckpointError(f"{index_path} is not a valid sharded-checkpoint index "
                              f"(JSON with a weight_map object)") from None
    names = set()
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{index_path} names a bad shard file {name!r} for tensor {key!r}")
        names.add(name)
    for name in sorted(names):
        if not (folder / name).is_file():
            raise CheckpointError(f"{index_path} lists shard {name}, but {folder / name} is missing")
    return weight_map, [folder / n for n in sorted(names)]


def is_weight_file(name: str) -> bool:
    """Whether a file name in an artifact folder belongs to the weights (shards or index)."""
    return name == INDEX_NAME or name.endswith(".safetensors")
