"""nf4 / fp4: bitsandbytes' 4-bit lookup-table format, bit-exact.

A weight of any shape is flattened row-major and cut into blocks of ``blocksize``
consecutive elements (blocks may span rows; the last one may be partial). Each block
stores its absolute maximum (fp32) and each element a 4-bit index into a 16-entry table
(NF4 or FP4) of values in [-1, 1]. Two indices share a byte, the **even element in the
high nibble**. Packed shape is bnb's ``[(n + 1) // 2, 1]`` uint8.

Double quantization (bnb ``compress_statistics``): the fp32 absmax vector is shifted by
its mean (``offset``) and quantized again with bnb's signed 8-bit dynamic map in blocks
of 256, so absmax costs 8 bits per block plus one fp32 per 256 blocks.

Rounding rules (why they look the way they do):
* normalisation multiplies by the fp32 reciprocal of absmax (the CUDA kernel does this);
* the nearest code is chosen by fp32 midpoints with a strict ``>``: a value exactly on
  a midpoint goes to the lower code (bnb CUDA decision tree and CPU ``bucketize`` agree);
* fp4 zero is always written as +0 (0b0000). bnb has two zero codes and picks them
  inconsistently (its CUDA kernel writes -0 for tiny negatives, its CPU path -0 for tiny
  positives); both decode to 0, so our tests treat 0b0000 and 0b1000 as equal.
* bnb's CUDA fp4 decision tree uses rounded literal thresholds (e.g. 0.583333f instead
  of the fp32 midpoint 0.58333337); values inside those ~1e-7 windows may encode
  differently from bnb-on-GPU. We follow the midpoint rule of bnb's reference backend.

Nothing here knows about models; ``quantkit.nn.Lut4Linear`` holds the packed tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

import torch

from quantkit.errors import FormatError

FORMAT_NAME = "lut4"
FORMAT_VERSION = 1
QUANT_TYPES = ("nf4", "fp4")
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def check_blocksize(blocksize: int, key: str = "blocksize") -> None:
    """ValueError naming recipe key ``key`` unless ``blocksize`` is one of VALID_BLOCKSIZES."""
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"'{key}' must be one of {', '.join(map(str, VALID_BLOCKSIZES))}, got {blocksize}")
NESTED_BLOCKSIZE = 256  # bnb hard-codes 256 for the nested (double-quant) absmax blocks
_CHUNK_ELEMENTS = 1 << 22  # weights quantized per step (bounds temporaries, not results)

# NF4: quantiles of N(0, 1) rescaled to [-1, 1] (QLoRA); sorted, so index == rank.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (e2m1 variant) in bit-pattern order: bit 3 is the sign, bits 0-2 index the
# magnitude table {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


def code_table(quant_type: str) -> torch.Tensor:
    """The 16-entry fp32 lookup table (bnb's ``quant_map``) for ``quant_type``."""
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32)
    if quant_type == "fp4":
        # divide in fp32, as bnb builds its table, so quant_map matches bit for bit
        return torch.tensor(_FP4_MAGNITUDES + tuple(-m for m in _FP4_MAGNITUDES),
                            dtype=torch.float32) / 12.0
    raise FormatError(f"unknown 4-bit quant_type {quant_type!r}; valid: {', '.join(QUANT_TYPES)}")


def dynamic_map_signed8() -> torch.Tensor:
    """bnb's signed 8-bit dynamic map (``create_dynamic_map(signed=True)``), 256 sorted fp32.

    Level i (0..6) contributes the 2**i midpoints of an fp32 ``linspace(0.1, 1, 2**i + 1)``
    scaled by ±10**(i - 6); then 0 and 1.0 are added. The arithmetic is done in fp32 with
    the same operations as the original so the values match bit for bit (tested).
    """
    values: list[float] = []
    for level in range(7):
        edges = torch.linspace(0.1, 1, 2**level + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (level - 6)
        values += (scale * mids).tolist()
        values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass(frozen=True)
class Lut4State:
    """Everything about a packed weight that is not a tensor (bnb's JSON quant_state).

    shape: the original weight shape; dtype: its torch dtype name ("float32", "bfloat16",
    "float16"); nested_offset: mean of the fp32 absmax vector (double quant only).
    """

    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: str
    nested: bool
    nested_blocksize: int = NESTED_BLOCKSIZE
    nested_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise FormatError(f"quant_type {self.quant_type!r} is not one of {QUANT_TYPES}")
        if self.blocksize not in VALID_BLOCKSIZES:
            raise FormatError(f"blocksize {self.blocksize} is not one of {VALID_BLOCKSIZES}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise FormatError(f"dtype {self.dtype!r} must be float32, bfloat16 or float16")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def n_nested_blocks(self) -> int:
        return -(-self.n_blocks // self.nested_blocksize)

    def to_json(self) -> str:
        """bnb's JSON blob: same key order and ``json.dumps`` defaults, byte for byte."""
        d: dict = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                   "dtype": self.dtype, "shape": list(self.shape)}
        if self.nested:
            d.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                     nested_offset=self.nested_offset)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "Lut4State":
        try:
            d = json.loads(text)
            nested = "nested_offset" in d
            return cls(quant_type=d["quant_type"], blocksize=int(d["blocksize"]),
                       shape=tuple(int(s) for s in d["shape"]), dtype=str(d["dtype"]),
                       nested=nested, nested_blocksize=int(d.get("nested_blocksize", NESTED_BLOCKSIZE)),
                       nested_offset=float(d.get("nested_offset", 0.0)))
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"malformed bitsandbytes quant_state JSON: {e}") from None

    def bits_per_weight(self) -> float:
        """Storage cost including scales: 4 + absmax bits per weight (+ nested scales)."""
        n = self.numel
        absmax_bits = (8 * self.n_blocks + 32 * self.n_nested_blocks) if self.nested else 32 * self.n_blocks
        return (8 * ((n + 1) // 2) + absmax_bits) / n


@dataclass
class Lut4Weight:
    """Packed tensors of one weight (bnb key names in the comments).

    packed:           uint8 [(n+1)//2, 1]      ``weight``
    absmax:           fp32 [n_blocks] or uint8 [n_blocks] when nested   ``weight.absmax``
    quant_map:        fp32 [16]                ``weight.quant_map``
    nested_absmax:    fp32 [n_nested_blocks]   ``weight.nested_absmax`` (nested only)
    nested_quant_map: fp32 [256]               ``weight.nested_quant_map`` (nested only)
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    state: Lut4State
    nested_absmax: Optional[torch.Tensor] = None
    nested_quant_map: Optional[torch.Tensor] = None


def _nearest_by_midpoints(x: torch.Tensor, sorted_code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest sorted code value; exact midpoints go to the lower index."""
    mids = (sorted_code[:-1] + sorted_code[1:]) / 2
    return torch.bucketize(x, mids, right=False)


def _blockwise_absmax_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 absmax per block and the block values times 1/absmax, clamped to [-1, 1]."""
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    # bnb guards an all-zero block with clamp(min=1e-38) before taking the reciprocal.
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = torch.clamp(padded * inv[:, None], -1, 1).reshape(-1)[:n]
    return absmax, scaled


def _fp4_signed_sorted() -> tuple[torch.Tensor, torch.Tensor]:
    """The 15 distinct fp4 values sorted ascending, and the 4-bit pattern of each (+0 for 0)."""
    table = code_table("fp4")
    patterns = [i for i in range(16) if i != 8]  # drop -0: zero always encodes as +0
    values = table[patterns]
    order = torch.argsort(values)
    return values[order], torch.tensor(patterns, dtype=torch.uint8)[order]


_FP4_SORTED, _FP4_SORTED_BITS = _fp4_signed_sorted()


def _encode(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit codes (uint8, one per element) of values already scaled to [-1, 1].

    Both formats use nearest-by-fp32-midpoint over the *signed* sorted table with exact
    midpoints going to the lower value, as bnb's reference (default) backend does; for a
    negative fp4 value on a midpoint that is the larger magnitude.
    """
    if quant_type == "nf4":
        return _nearest_by_midpoints(scaled, torch.tensor(NF4_CODE, dtype=torch.float32)).to(torch.uint8)
    return _FP4_SORTED_BITS[_nearest_by_midpoints(scaled, _FP4_SORTED)]


def quantize_blockwise8(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb 8-bit blockwise quantization: (uint8 codes [n], fp32 absmax [ceil(n/blocksize)])."""
    absmax, scaled = _blockwise_absmax_scaled(x.reshape(-1).float(), blocksize)
    return _nearest_by_midpoints(scaled, code).to(torch.uint8), absmax


def quantize(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
             double_quant: bool = True) -> Lut4Weight:
    """Quantize ``w`` (any shape, fp32/bf16/fp16, finite) exactly as bnb ``quantize_4bit``."""
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise FormatError(f"4-bit quantization takes float32/bfloat16/float16 weights, got {w.dtype}")
    state_dtype = str(w.dtype).removeprefix("torch.")
    code = code_table(quant_type)
    # validate before doing work
    state = Lut4State(quant_type, blocksize, tuple(w.shape), state_dtype, double_quant)
    flat = w.detach().reshape(-1).float().cpu()
    # Work through the weight in chunks of whole blocks so the temporaries (fp32 scaled
    # values, int64 bucket indices) stay ~100 MB whatever the layer size; blocks are
    # independent and every chunk but the last holds an even number of elements, so the
    # result is bit-identical to one pass over the whole weight.
    step = max(1, _CHUNK_ELEMENTS // blocksize) * blocksize
    absmax_parts, packed_parts = [], []
    for start in range(0, max(flat.numel(), 1), step):
        part_absmax, scaled = _blockwise_absmax_scaled(flat[start:start + step], blocksize)
        if scaled.numel() % 2:
            # bnb pads an odd count with the *value* 0.0, which is code 7 in nf4 and 0 in fp4
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = _encode(scaled, quant_type)
        packed_parts.append((q[0::2] << 4) | q[1::2])
        absmax_parts.append(part_absmax)
        del scaled, q
    absmax = absmax_parts[0] if len(absmax_parts) == 1 else torch.cat(absmax_parts)
    packed = (packed_parts[0] if len(packed_parts) == 1 else torch.cat(packed_parts)).unsqueeze(1).contiguous()
    del packed_parts
    if not double_quant:
        return Lut4Weight(packed, absmax, code, state)
    offset = absmax.mean()
    nested_code = dynamic_map_signed8()
    q_absmax, nested_absmax = quantize_blockwise8(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    state = Lut4State(quant_type, blocksize, tuple(w.shape), state_dtype, True,
                      NESTED_BLOCKSIZE, offset.item())
    return Lut4Weight(packed, q_absmax, code, state, nested_absmax, nested_code)


def decode_absmax(q: Lut4Weight) -> torch.Tensor:
    """fp32 absmax per block, undoing double quantization when present."""
    if not q.state.nested:
        return q.absmax.float()
    nb = q.state.nested_blocksize
    idx = torch.arange(q.absmax.numel()) // nb
    return q.nested_quant_map[q.absmax.long()] * q.nested_absmax[idx] + q.state.nested_offset


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [n] codes from packed bytes (high nibble = even element)."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return codes[:n]


def dequantize(q: Lut4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization: code[idx] * absmax[block], in fp32, then cast to ``dtype``."""
    n = q.state.numel
    vals = q.quant_map[unpack_codes(q.packed, n).long()]
    blocks = torch.arange(n) // q.state.blocksize
    return (vals * decode_absmax(q)[blocks]).reshape(q.state.shape).to(dtype)
