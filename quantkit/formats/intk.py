"""int-k: k-bit integer codes (k = 1..8) with one fp32 scale per output channel.

A weight W [N, K] (N = out_features rows, K = in_features columns) is stored as

    W[r, c] = (code[r, c] - offset) * scale[r]        in fp32, exactly this expression

code: unsigned k-bit integers; offset: one float per tensor, a multiple of 0.5, so the
same layout covers every grid quantkit's QAT quantizers produce:

    grid      bits  codes      offset        scale       values / scale
    lsq       2..8  0..2^k-1   2^(k-1)       alpha       -2^(k-1) .. 2^(k-1)-1   (LSQ, symmetric int)
    sign      1     0, 1       0.5           2*alpha     -0.5, +0.5              (sign(w) * alpha)
    seq       2     0..3       1.5           alpha/2     -1.5 .. 1.5             (ParetoQ SEQ: ±0.25, ±0.75 alpha)
    ternary   2     0..2       1.0           alpha/1.5   -1, 0, 1                (ParetoQ ternary: 0, ±2/3 alpha)

Packing: each row is its own little-endian bitstream of ``ceil(K * k / 8)`` bytes. Code c of
a row occupies bits ``[c*k, c*k + k)`` of that row's bytes, where bit p is bit ``p % 8``
(LSB first) of byte ``p // 8``; unused high bits of a row's last byte are zero. Rows start
on byte boundaries, so a row can be decoded without touching its neighbours. Packed shape:
uint8 [N, ceil(K * k / 8)]; scale: fp32 [N].

Nothing here knows about models or training; ``quantkit.nn.IntKLinear`` holds the tensors
and ``quantkit.qat`` produces the codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantkit.errors import FormatError

FORMAT_NAME = "intk"
FORMAT_VERSION = 1
VALID_BITS = tuple(range(1, 9))
GRIDS = ("lsq", "sign", "seq", "ternary")
_CHUNK_ROWS_ELEMENTS = 1 << 22  # codes packed per step (bounds the bit-tensor temporaries)


def row_bytes(cols: int, bits: int) -> int:
    """Bytes one packed row of ``cols`` k-bit codes takes."""
    return -(-cols * bits // 8)


@dataclass(frozen=True)
class IntKState:
    """Everything about a packed int-k weight that is not a tensor.

    bits: code width 1..8; offset: subtracted from every code (a multiple of 0.5 in
    [0, 2^bits - 1]); grid: which quantizer grid produced it (documentation: the decode
    only uses bits, offset and scale); shape: (out_features, in_features); dtype: the
    original weight dtype name ("float32", "bfloat16", "float16").
    """

    bits: int
    offset: float
    grid: str
    shape: tuple[int, int]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.bits not in VALID_BITS:
            raise FormatError(f"int-k bits must be one of {VALID_BITS}, got {self.bits}")
        if self.grid not in GRIDS:
            raise FormatError(f"int-k grid {self.grid!r} is not one of {GRIDS}")
        if not (0 <= self.offset <= 2**self.bits - 1) or (2 * self.offset) != int(2 * self.offset):
            raise FormatError(f"int-k offset {self.offset} must be a multiple of 0.5 in [0, {2**self.bits - 1}]")
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise FormatError(f"int-k weight shape {self.shape} must be 2-D with positive sizes")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise FormatError(f"dtype {self.dtype!r} must be float32, bfloat16 or float16")

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.shape[1], self.bits)

    def bits_per_weight(self) -> float:
        """Storage cost: packed rows (with their byte padding) + one fp32 scale per row."""
        n, k = self.shape
        return (8 * n * self.row_bytes + 32 * n) / (n * k)


@dataclass
class IntKWeight:
    """Packed tensors of one weight: packed uint8 [N, row_bytes], scale fp32 [N]."""

    packed: torch.Tensor
    scale: torch.Tensor
    state: IntKState


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [N, row_bytes] from integer codes [N, K] in [0, 2^bits) (see the module doc)."""
    if codes.dim() != 2:
        raise FormatError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if bits not in VALID_BITS:
        raise FormatError(f"int-k bits must be one of {VALID_BITS}, got {bits}")
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise FormatError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing")
    n, k = codes.shape
    nbytes = row_bytes(k, bits)
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = (1 << torch.arange(8, dtype=torch.int64))
    out = torch.empty((n, nbytes), dtype=torch.uint8)
    step = max(1, _CHUNK_ROWS_ELEMENTS // max(k * bits, 1))
    for r0 in range(0, n, step):
        c = codes[r0:r0 + step]
        # bit i of code j -> stream position j*bits + i
        stream = ((c[:, :, None] >> shifts) & 1).reshape(c.shape[0], k * bits)
        stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - k * bits))
        out[r0:r0 + step] = (stream.view(c.shape[0], nbytes, 8) * weights).sum(-1).to(torch.uint8)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int64 codes [N, cols] from uint8 [N, row_bytes] (exact inverse of ``pack_codes``)."""
    n = packed.shape[0]
    nbytes = row_bytes(cols, bits)
    if packed.dim() != 2 or packed.shape[1] != nbytes or packed.dtype != torch.uint8:
        raise FormatError(f"packed must be uint8 [{n}, {nbytes}] for {cols} {bits}-bit codes per row, got "
                          f"{packed.dtype} {list(packed.shape)}")
    bitpos = torch.arange(8, dtype=torch.int64, device=packed.device)
    stream = ((packed.to(torch.int64)[:, :, None] >> bitpos) & 1).reshape(n, nbytes * 8)[:, :cols * bits]
    place = (1 << torch.arange(bits, dtype=torch.int64, device=packed.device))
    return (stream.reshape(n, cols, bits) * place).sum(-1)


def from_codes(codes: torch.Tensor, scale: torch.Tensor, bits: int, offset: float, grid: str,
               dtype: str = "float32") -> IntKWeight:
    """Pack integer codes [N, K] and fp32 per-row scales [N] into an ``IntKWeight``."""
    state = IntKState(bits, float(offset), grid, (int(codes.shape[0]), int(codes.shape[1])), dtype)
    scale = scale.detach().reshape(-1).to(torch.float32).cpu().contiguous()
    if scale.numel() != codes.shape[0]:
        raise FormatError(f"scale has {scale.numel()} entries but the weight has {codes.shape[0]} rows")
    if not torch.isfinite(scale).all():
        raise FormatError("int-k scales must be finite")
    return IntKWeight(pack_codes(codes.detach().cpu(), bits), scale, state)


def dequantize(q: IntKWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization: (code - offset) * scale[row] in fp32, then cast to ``dtype``."""
    codes = unpack_codes(q.packed, q.state.bits, q.state.shape[1])
    return ((codes.to(torch.float32) - q.state.offset) * q.scale[:, None]).to(dtype)


def payload_bits(state: IntKState) -> float:
    """Information content of a code (log2 of the grid's level count): 1.58 for ternary."""
    return math.log2(3) if state.grid == "ternary" else float(state.bits)


def quantize_rows(w: torch.Tensor, bits: int = 8, dtype: str = "float32") -> IntKWeight:
    """Round-to-nearest, symmetric, one scale per row: scale[r] = max|w[r]| / (2^(bits-1) - 1),
    code = round(w / scale) + 2^(bits-1), so values run over ±(2^(bits-1) - 1)·scale (the
    lowest code, -2^(bits-1), is never produced). An all-zero row gets scale 0 (decodes to 0).
    w: [N, K] any float dtype (read, never modified); bits 2..8. Rows are done in chunks of
    ~4 M weights, so a 262k-row embedding table needs no full-size fp32 temporaries."""
    if w.dim() != 2:
        raise FormatError(f"quantize_rows needs a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if not 2 <= bits <= 8:
        raise FormatError(f"quantize_rows supports 2..8 bits, got {bits}")
    n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    offset = 2 ** (bits - 1)
    scale = torch.empty(n, dtype=torch.float32)
    packed = torch.empty((n, row_bytes(k, bits)), dtype=torch.uint8)
    step = max(1, _CHUNK_ROWS_ELEMENTS // max(k, 1))
    for r0 in range(0, n, step):
        rows = w[r0:r0 + step].detach().to(torch.float32).cpu()
        s = rows.abs().amax(dim=1) / qmax
        safe = torch.where(s > 0, s, torch.ones_like(s))
        codes = torch.clamp(torch.round(rows / safe[:, None]), -qmax, qmax).to(torch.int64) + offset
        scale[r0:r0 + step] = s
        packed[r0:r0 + step] = pack_codes(codes, bits)
    state = IntKState(bits, float(offset), "lsq", (int(n), int(k)), dtype)
    return IntKWeight(packed, scale, state)
