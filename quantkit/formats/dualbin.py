"""dualbin: DB-LLM's Flexible Dual Binarization (FDB) storage format, 2 bits + 2 scales.

A weight ``W`` [N, K] is cut into groups of ``group`` (default 64) consecutive elements
along K, per row. Each weight is the sum of two binary planes with per-group scales::

    W[n, k] = alpha1[n, g] * b1[n, k] + alpha2[n, g] * b2[n, k],   b1, b2 in {0, 1},  g = k // group

so each group has the four levels {0, alpha2, alpha1, alpha1 + alpha2}.

Packing (see docs/format.md, "dualbin"): each plane is uint8 [N, Kp / 8] with
Kp = ceil(K / group) * group (rows padded with 0 bits to whole groups, so every group and
every row starts on a byte boundary); element k of a row is bit (k % 8) of byte k // 8
(LSB first), so a group of 64 is one little-endian uint64 and a CPU kernel can use the
bits directly as vector masks. alpha1/alpha2 are fp16 [N, ceil(K / group)]. A K that is
not a multiple of ``group`` is PADDED (not refused): the last group of each row simply
holds fewer real weights, its padding bits are 0 and never read as weights.
Storage: 2 bits per weight plus 32 bits per group: 2.5 bits/weight at group 64 when K is
a multiple of 64.

Initialisation (``quantize``): FDB starts from 2-bit uniform quantization on the
asymmetric grid {-1, 0, 1, 2}·s, i.e. alpha1 = 2s, alpha2 = -s (reference
algorithms.md §1.1). ``s`` is chosen per group by ``init``:
  "absmax": s = max|w| / 2 (the community FDB implementation's choice);
  "mse":    s = c·sign·max|w| / 2 for the c in a small grid and sign in {+1, -1} that
            minimises the group's squared error (sign -1 mirrors the grid onto the
            negative side, {1, 0, -1, -2}·|s|, which the format expresses for free).
s is rounded to fp16 before the bits are chosen, so 2s and -s are exact fp16 values and
the dequantized weight equals RTN on the {-1, 0, 1, 2}·s grid exactly.

Bits for given (possibly trained) scales: the nearest of the four levels (``encode``),
ties going to the lower level index in the order (0, alpha2, alpha1, alpha1+alpha2).
At init this is the same as DB-LLM's two Heaviside steps (thresholds -s/2, s/2, 1.5s).

Nothing here knows about models; ``quantkit.nn.DualBinLinear`` holds the packed tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantkit.errors import FormatError

FORMAT_NAME = "dualbin"
FORMAT_VERSION = 1
VALID_GROUPS = (32, 64, 128, 256)  # multiples of 16: the CPU kernel reads 16 mask bits at a time
INIT_METHODS = ("absmax", "mse")
# Clip ratios tried by init="mse" (c in s = c * absmax / 2); 1.0 is the absmax choice.
MSE_GRID = tuple(round(0.30 + 0.05 * i, 2) for i in range(15))  # 0.30 .. 1.00


@dataclass(frozen=True)
class DualBinState:
    """Non-tensor facts of a packed weight. shape: (N, K); group: elements per scale pair
    along K; dtype: the original weight dtype name (informational)."""

    shape: tuple[int, int]
    group: int = 64
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.group not in VALID_GROUPS:
            raise FormatError(f"dualbin group {self.group} is not one of {VALID_GROUPS}")
        if len(self.shape) != 2 or min(self.shape) < 0:
            raise FormatError(f"dualbin weights are 2-D [N, K], got shape {self.shape}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise FormatError(f"dtype {self.dtype!r} must be float32, bfloat16 or float16")

    @property
    def n_groups(self) -> int:
        """Groups per row: ceil(K / group)."""
        return -(-self.shape[1] // self.group)

    @property
    def row_bytes(self) -> int:
        """Bytes per row of one plane: n_groups * group / 8."""
        return self.n_groups * self.group // 8

    def bits_per_weight(self) -> float:
        """Stored bits (two planes incl. padding + fp16 alpha1/alpha2) per real weight."""
        n, k = self.shape
        if n * k == 0:
            return float("nan")
        return (8 * 2 * n * self.row_bytes + 2 * 16 * n * self.n_groups) / (n * k)


@dataclass
class DualBinWeight:
    """Packed tensors of one weight.

    plane1, plane2: uint8 [N, n_groups * group / 8], LSB-first along K, padding bits 0
    alpha1, alpha2: fp16 [N, n_groups]
    """

    plane1: torch.Tensor
    plane2: torch.Tensor
    alpha1: torch.Tensor
    alpha2: torch.Tensor
    state: DualBinState


_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """{0,1} tensor [N, Kp] (Kp % 8 == 0, any int/bool dtype) -> uint8 [N, Kp/8], LSB first."""
    n, kp = bits.shape
    if kp % 8:
        raise FormatError(f"pack_bits needs a multiple of 8 columns, got {kp}")
    b = bits.to(torch.uint8).reshape(n, kp // 8, 8)
    return (b * _BIT_WEIGHTS.to(b.device)).sum(-1, dtype=torch.uint8)  # distinct bits: sum == OR


def unpack_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, B] -> uint8 {0,1} [N, k] (k <= 8B): bit j of byte i is element 8i + j."""
    n, nbytes = packed.shape
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(n, nbytes * 8)[:, :k]


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 [N, K] -> [N, G, group], zero-padded along K."""
    n, k = w.shape
    g = -(-k // group)
    return torch.nn.functional.pad(w.float(), (0, g * group - k)).view(n, g, group)


def levels(alpha1: torch.Tensor, alpha2: torch.Tensor) -> torch.Tensor:
    """The four levels per group in code order (b1, b2) = (0,0), (0,1), (1,0), (1,1):
    fp32 [..., 4] = [0, alpha2, alpha1, alpha1 + alpha2] (alphas as fp32)."""
    a1, a2 = alpha1.float(), alpha2.float()
    return torch.stack([torch.zeros_like(a1), a2, a1, a1 + a2], dim=-1)


def encode(w: torch.Tensor, alpha1: torch.Tensor, alpha2: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-level bits of ``w`` [N, K] for scales [N, G]: (b1, b2) uint8 {0,1} [N, G*group]
    (padding columns 0). Ties go to the lower code (0, alpha2, alpha1, alpha1+alpha2)."""
    wg = _grouped(w, group)                                     # [N, G, group]
    lv = levels(alpha1, alpha2)                                 # [N, G, 4]
    code = (wg.unsqueeze(-1) - lv.unsqueeze(2)).abs().argmin(-1)  # [N, G, group]; argmin takes the first
    n, k = w.shape
    b1 = (code >> 1).to(torch.uint8).reshape(n, -1)
    b2 = (code & 1).to(torch.uint8).reshape(n, -1)
    b1[:, k:] = 0
    b2[:, k:] = 0
    return b1, b2


def init_step(w: torch.Tensor, group: int = 64, init: str = "mse") -> torch.Tensor:
    """Per-group 2-bit step s (fp32 [N, G], already representable in fp16; may be negative
    with init="mse", see the module docstring). An all-zero group gets s = 0."""
    if init not in INIT_METHODS:
        raise FormatError(f"dualbin init {init!r} is not one of {INIT_METHODS}")
    wg = _grouped(w, group)
    absmax = wg.abs().amax(-1)                                   # [N, G]
    if init == "absmax":
        return (absmax / 2).half().float()
    best_err = torch.full_like(absmax, float("inf"))
    best_s = (absmax / 2).half().float()
    for sign in (1.0, -1.0):
        for c in MSE_GRID:
            s = (sign * c * absmax / 2).half().float()
            safe = torch.where(s == 0, torch.ones_like(s), s)
            q = torch.clamp(torch.round(wg / safe.unsqueeze(-1)), -1, 2) * s.unsqueeze(-1)
            err = (q - wg).pow(2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
    return best_s


def pack(b1: torch.Tensor, b2: torch.Tensor, alpha1: torch.Tensor, alpha2: torch.Tensor,
         shape: tuple[int, int], group: int = 64, dtype: str = "float32") -> DualBinWeight:
    """Pack {0,1} planes [N, >=K] and scales [N, G] (rounded to fp16) into a DualBinWeight."""
    state = DualBinState((int(shape[0]), int(shape[1])), group, dtype)
    n, g = shape[0], state.n_groups
    kp = g * group
    if tuple(alpha1.shape) != (n, g) or tuple(alpha2.shape) != (n, g):
        raise FormatError(f"alpha1/alpha2 must be [{n}, {g}] for shape {tuple(shape)} at group {group}, got "
                          f"{list(alpha1.shape)} and {list(alpha2.shape)}")
    planes = []
    for b in (b1, b2):
        b = b.to(torch.uint8)
        if b.shape[0] != n or b.shape[1] < shape[1]:
            raise FormatError(f"bit plane {list(b.shape)} does not cover weight {tuple(shape)}")
        full = torch.zeros(n, kp, dtype=torch.uint8, device=b.device)
        full[:, :shape[1]] = b[:, :shape[1]]  # padding bits are always 0
        planes.append(pack_bits(full).contiguous())
    return DualBinWeight(planes[0], planes[1], alpha1.detach().half().contiguous(),
                         alpha2.detach().half().contiguous(), state)


def quantize(w: torch.Tensor, group: int = 64, init: str = "mse") -> DualBinWeight:
    """FDB initialisation of ``w`` [N, K] (finite fp32/bf16/fp16): alpha1 = 2s, alpha2 = -s."""
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise FormatError(f"dualbin quantization takes float32/bfloat16/float16 weights, got {w.dtype}")
    if w.dim() != 2:
        raise FormatError(f"dualbin quantization takes a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    dtype = str(w.dtype).removeprefix("torch.")
    DualBinState(tuple(w.shape), group, dtype)  # validate before doing work
    w = w.detach().float().cpu()
    s = init_step(w, group, init)
    alpha1, alpha2 = (2 * s).half(), (-s).half()
    b1, b2 = encode(w, alpha1, alpha2, group)
    return pack(b1, b2, alpha1, alpha2, tuple(w.shape), group, dtype)


def dequantize(q: DualBinWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference: alpha1 * b1 + alpha2 * b2 in fp32 [N, K], cast to ``dtype``."""
    n, k = q.state.shape
    group = q.state.group
    kp = q.state.n_groups * group
    b1 = unpack_bits(q.plane1, kp).float().view(n, -1, group)
    b2 = unpack_bits(q.plane2, kp).float().view(n, -1, group)
    w = q.alpha1.float().unsqueeze(-1) * b1 + q.alpha2.float().unsqueeze(-1) * b2
    return w.reshape(n, kp)[:, :k].to(dtype)


def numel(q: DualBinWeight) -> int:
    return math.prod(q.state.shape)
