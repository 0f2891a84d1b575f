"""Fake quantizers with straight-through gradients, on the grids quantkit can pack.

Every quantizer maps a weight W [N, K] (fp32; other dtypes are computed in fp32 and cast
back) to a quantized weight Ŵ of the same shape. The int grids (``IntFakeQuant``) write Ŵ as

    Ŵ[r, c] = t[r, c] * step[r]        t = code - offset  (a half-integer level)

with ``step`` derived from one learnable scale α per output row; that is exactly the
expression ``quantkit.formats.intk.dequantize`` evaluates on the packed codes, so the
fake-quant forward and the converted module's weight are bit-identical (tested).

Grids (ParetoQ's choice per bit width, see ../shared/reference/algorithms.md §3.6):
  lsq      bits 2..8  t = clamp(round(W/α), -2^(b-1), 2^(b-1)-1), step = α   (LSQ)
  sign     bits 1     t = ±0.5 (sign of W, 0 -> +), step = 2α               (Ŵ = sign(W)·α)
  seq      bits 2     t = round(clamp(W/α, ±c)·2 - 0.5) + 0.5, step = α/2   (stretched elastic:
                      levels ±0.25α, ±0.75α, no zero), c = 1 - 1e-2
  ternary  (2 bits)   t = round(clamp(W/α, ±c)·1.5), step = α/1.5           (levels 0, ±2/3 α)

Gradients (straight-through estimator with a clipping mask, LSQ for the scale):
  dL/dW = dL/dŴ · 1[W/α inside the grid's clip range]   (sign: no mask, plain identity)
  dL/dα = Σ_row dL/dŴ · (t·step/α - (W/α)·1[inside]) · g,   g = 1/sqrt(numel · Qp)
          (Qp = 2^(b-1)-1 for lsq, 1 otherwise; sign: dŴ/dα = sign(W)). The gradient scale g
          is LSQ's, which keeps α's updates on the weights' scale whatever the layer size.

``DualBinFakeQuant`` trains DB-LLM's dual-binary grid (two {0,1} planes, α1/α2 per group of 64
along K; see its docstring) and converts to ``DualBinLinear``.

``Lut4FakeQuant`` fake-quantizes on the nf4/fp4 PTQ grid (blockwise absmax, optional double
quantization) by calling the PTQ quantizer itself, so Ŵ is exactly what ``Lut4Linear``
dequantizes after ``convert``; its scales are absmax values, not learned, and the gradient
is the plain identity (STE).

Scale initialisation (``init_scale``, called when QAT switches on, from the weights FP
training produced): sign uses α = mean|W_row| (the L2-optimal binary scale); the other int
grids pick, per row, the α = ratio · α_max (ratio in 0.20, 0.25, ..., 1.0) with the least
squared error, α_max being the scale at which the row's largest |W| lands on the top level.
Converting right after initialisation is therefore round-to-nearest with an MSE-searched
clip per row.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from quantkit.errors import UsageError
from quantkit.formats import intk, lut4

SEQ_CLIP = 1.0 - 1e-2
MIN_ALPHA = 1e-8  # α is clamped to this in every use (it is learned and could reach <= 0)
_RATIOS = tuple(0.2 + 0.05 * i for i in range(17))  # 0.20 .. 1.00

# grid -> (offset as a function of bits, default bits)
INT_GRIDS = ("lsq", "sign", "seq", "ternary")
LUT_GRIDS = ("nf4", "fp4")


def _grid_params(grid: str, bits: int) -> tuple[float, float, float, float, float]:
    """(levels per α ``n``, half-shift ``s``, lowest t, highest t, Qp) of an int grid.

    lsq: t in [-2^(b-1), 2^(b-1)-1], step = α (n = 1); seq: n = 2, s = 0.5;
    ternary: n = 1.5, s = 0; sign: n = 0.5 (step = 2α), t = ±0.5.
    """
    if grid == "lsq":
        qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
        return 1.0, 0.0, -float(qn), float(qp), float(max(qp, 1))
    if grid == "seq":
        return 2.0, 0.5, -1.5, 1.5, 1.0
    if grid == "ternary":
        return 1.5, 0.0, -1.0, 1.0, 1.0
    if grid == "sign":
        return 0.5, 0.0, -0.5, 0.5, 1.0
    raise UsageError(f"unknown int grid {grid!r}; valid: {', '.join(INT_GRIDS)}")


def grid_offset(grid: str, bits: int) -> float:
    """The int-k format offset (code = t + offset) of ``grid`` at ``bits``."""
    return -_grid_params(grid, bits)[2]


def step_size(alpha: torch.Tensor, grid: str, bits: int) -> torch.Tensor:
    """Per-row quantization step (the packed format's scale) from α, in fp32.

    One expression shared by the fake quantizer and ``convert``: both must round α/n the
    same way for the fake-quant weight to equal the packed one bit for bit.
    """
    n = _grid_params(grid, bits)[0]
    alpha = alpha.to(torch.float32)
    if n == 1.0:
        return alpha
    if n == 0.5:
        return alpha * 2.0
    return alpha / n


def levels(w: torch.Tensor, alpha: torch.Tensor, grid: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, inside): the half-integer level of each weight and the STE clip mask.

    w: fp32 [N, K]; alpha: fp32 [N, 1] (positive). t is fp32, exactly code - offset.
    """
    n, s, lo, hi, _ = _grid_params(grid, bits)
    v = w / alpha
    if grid == "sign":
        return torch.where(v >= 0, 0.5, -0.5).to(torch.float32), torch.ones_like(v, dtype=torch.bool)
    if grid == "lsq":
        t = torch.clamp(torch.round(v), lo, hi)
        return t, (v >= lo) & (v <= hi)
    vc = torch.clamp(v, -SEQ_CLIP, SEQ_CLIP)
    t = torch.round(vc * n - s) + s
    return t, v.abs() < SEQ_CLIP


class _IntSTE(torch.autograd.Function):
    """Ŵ = t · step(α) forward; STE + LSQ gradients backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, w, alpha, grid: str, bits: int):
        wf = w.to(torch.float32)
        a = alpha.to(torch.float32).clamp(min=MIN_ALPHA)
        t, inside = levels(wf, a, grid, bits)
        out = t * step_size(a, grid, bits)
        ctx.save_for_backward(wf, a, t, inside)
        ctx.meta = (grid, bits, w.dtype, alpha.dtype)
        return out.to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        wf, a, t, inside = ctx.saved_tensors
        grid, bits, w_dtype, a_dtype = ctx.meta
        n, _, _, _, qp = _grid_params(grid, bits)
        g = grad.to(torch.float32)
        grad_w = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_w = (g if grid == "sign" else g * inside).to(w_dtype)
        if ctx.needs_input_grad[1]:
            if grid == "sign":
                d_alpha = torch.where(t > 0, 1.0, -1.0)
            else:
                d_alpha = t / n - torch.where(inside, wf / a, 0.0)
            scale = 1.0 / math.sqrt(wf.numel() * qp)
            grad_a = ((g * d_alpha).sum(dim=1, keepdim=True) * scale).to(a_dtype)
        return grad_w, grad_a, None, None


class IntFakeQuant(nn.Module):
    """Learnable per-output-channel scale α [N, 1] on an int grid (lsq / sign / seq / ternary)."""

    def __init__(self, out_features: int, grid: str, bits: int):
        super().__init__()
        _grid_params(grid, bits)  # validates
        self.grid = grid
        self.bits = bits
        self.alpha = nn.Parameter(torch.ones(out_features, 1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def offset(self) -> float:
        return grid_offset(self.grid, self.bits)

    @torch.no_grad()
    def init_scale(self, w: torch.Tensor) -> None:
        """Set α from the weight (see the module docstring); marks the quantizer initialized."""
        wf = w.detach().to(torch.float32)
        if self.grid == "sign":
            alpha = wf.abs().mean(dim=1, keepdim=True)
        else:
            n, s, lo, hi, _ = _grid_params(self.grid, self.bits)
            # α_max: the largest |W| of the row lands on the top level (t = hi, i.e. hi·step)
            top = hi / n
            alpha_max = wf.abs().amax(dim=1, keepdim=True) / top
            best_err = best = None
            for r in _RATIOS:
                cand = (alpha_max * r).clamp(min=MIN_ALPHA)
                t, _ = levels(wf, cand, self.grid, self.bits)
                err = ((t * step_size(cand, self.grid, self.bits) - wf) ** 2).sum(dim=1, keepdim=True)
                if best is None:
                    best, best_err = cand, err
                else:
                    better = err < best_err
                    best = torch.where(better, cand, best)
                    best_err = torch.where(better, err, best_err)
            alpha = best
        alpha = alpha.clamp(min=MIN_ALPHA)  # an all-zero row: any positive α gives zeros
        self.alpha.copy_(alpha.to(self.alpha.dtype))
        self.initialized.fill_(True)

    def forward(self, w: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _IntSTE.apply(w, self.alpha if alpha is None else alpha, self.grid, self.bits)

    @torch.no_grad()
    def codes(self, w: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 codes [N, K], fp32 step [N]) of ``w``: what ``intk.from_codes`` packs."""
        a = (self.alpha if alpha is None else alpha).detach().to(torch.float32).clamp(min=MIN_ALPHA)
        t, _ = levels(w.detach().to(torch.float32), a, self.grid, self.bits)
        return (t + self.offset).round().to(torch.int64), step_size(a, self.grid, self.bits).reshape(-1)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, bits={self.bits}"


class _Passthrough(torch.autograd.Function):
    """Forward returns ``q`` (computed from w without grad); backward hands dL/dq to w (STE)."""

    @staticmethod
    def forward(ctx, w, q):
        return q

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class Lut4FakeQuant(nn.Module):
    """nf4/fp4 on the PTQ grid: Ŵ = lut4.dequantize(lut4.quantize(W)), identity gradient."""

    def __init__(self, quant_type: str, blocksize: int = 64, double_quant: bool = True):
        super().__init__()
        if quant_type not in LUT_GRIDS:
            raise UsageError(f"unknown 4-bit grid {quant_type!r}; valid: {', '.join(LUT_GRIDS)}")
        self.grid = quant_type
        self.bits = 4
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def init_scale(self, w: torch.Tensor) -> None:
        self.initialized.fill_(True)  # absmax scales are recomputed from W at every forward

    def quantized(self, w: torch.Tensor) -> torch.Tensor:
        q = lut4.quantize(w.detach(), self.grid, self.blocksize, self.double_quant)
        return lut4.dequantize(q, torch.float32).to(device=w.device, dtype=w.dtype)

    def forward(self, w: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        # not ``w + (q - w).detach()``: that rounds, and Ŵ must equal the packed weight exactly
        return _Passthrough.apply(w, self.quantized(w))

    def extra_repr(self) -> str:
        return f"grid={self.grid}, blocksize={self.blocksize}, double_quant={self.double_quant}"


class _DualBinSTE(torch.autograd.Function):
    """Ŵ = a1·b1 + a2·b2 per group with (b1, b2) the nearest of the levels (0, a2, a1, a1+a2);
    backward: identity to W (STE), Σ_group dL/dŴ·b to each scale. Saves only the bit planes."""

    @staticmethod
    def forward(ctx, wg, a1, a2):  # wg [N, G, group] fp32; a1, a2 [N, G] fp32
        from quantkit.passes.fdb_train import nearest_bits

        b1, b2 = nearest_bits(wg, a1.unsqueeze(-1), a2.unsqueeze(-1))
        ctx.save_for_backward(b1.bool(), b2.bool())
        return a1.unsqueeze(-1) * b1 + a2.unsqueeze(-1) * b2

    @staticmethod
    def backward(ctx, grad):
        b1, b2 = ctx.saved_tensors
        g1 = (grad * b1).sum(-1) if ctx.needs_input_grad[1] else None
        g2 = (grad * b2).sum(-1) if ctx.needs_input_grad[2] else None
        return (grad if ctx.needs_input_grad[0] else None), g1, g2


class DualBinFakeQuant(nn.Module):
    """DB-LLM's dual-binary grid (2 bits): per group of ``group`` weights along K (per row),
    Ŵ = α1·b1 + α2·b2 with b1, b2 ∈ {0, 1} the nearest of the four levels to W.

    alpha: one learnable tensor [2, N, G] (α1 = alpha[0], α2 = alpha[1]; one tensor so the
    frozen-phase snapshot of QATLinear covers both), initialised as the DB-LLM pass does
    (α1 = 2s, α2 = −s, s the MSE-searched 2-bit step of formats/dualbin.init_step). The scales
    are rounded to fp16 in the forward (straight-through) because the packed format stores
    them in fp16; the bits are chosen for those rounded scales, and ``convert`` packs exactly
    these bits and scales, so the fake-quant weight equals ``DualBinLinear``'s (tested).
    """

    def __init__(self, out_features: int, in_features: int, group: int = 64):
        super().__init__()
        from quantkit.formats import dualbin

        dualbin.DualBinState((out_features, in_features), group)  # validates the group
        self.grid, self.bits, self.group = "dualbin", 2, group
        self.alpha = nn.Parameter(torch.ones(2, out_features, -(-in_features // group)))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def init_scale(self, w: torch.Tensor) -> None:
        from quantkit.formats import dualbin

        s = dualbin.init_step(w.detach().to(torch.float32), self.group, "mse").to(self.alpha.device)
        self.alpha.copy_(torch.stack([2 * s, -s]).to(self.alpha.dtype))
        self.initialized.fill_(True)

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        n, k = w.shape
        g = self.alpha.shape[2]
        return torch.nn.functional.pad(w.to(torch.float32), (0, g * self.group - k)).view(n, g, self.group)

    @staticmethod
    def _fp16_scales(alpha: torch.Tensor) -> torch.Tensor:
        a = alpha.to(torch.float32)
        return a + (a.half().float() - a).detach()  # value: fp16-rounded; gradient: identity

    def forward(self, w: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        a = self._fp16_scales(self.alpha if alpha is None else alpha)
        n, k = w.shape
        w_hat = _DualBinSTE.apply(self._grouped(w), a[0], a[1])
        return w_hat.reshape(n, -1)[:, :k].to(w.dtype)

    @torch.no_grad()
    def pack(self, w: torch.Tensor, alpha: Optional[torch.Tensor] = None):
        """The ``dualbin.DualBinWeight`` of exactly the bits and fp16 scales ``forward`` uses."""
        from quantkit.formats import dualbin
        from quantkit.passes.fdb_train import nearest_bits

        a = (self.alpha if alpha is None else alpha).detach().to(torch.float32).half().float().cpu()
        wg = self._grouped(w.detach().cpu())
        b1, b2 = nearest_bits(wg, a[0].unsqueeze(-1), a[1].unsqueeze(-1))
        n, k = w.shape
        dtype = str(w.dtype).removeprefix("torch.")
        return dualbin.pack(b1.reshape(n, -1), b2.reshape(n, -1), a[0], a[1], (n, k), self.group, dtype)

    def extra_repr(self) -> str:
        return f"grid=dualbin, group={self.group}"


def default_grid(bits: int) -> str:
    """ParetoQ's grid per bit width: 1 -> sign, 2 -> seq, 3..8 -> lsq."""
    return {1: "sign", 2: "seq"}.get(bits, "lsq")


def make_quantizer(out_features: int, grid: str, bits: int, blocksize: int = 64,
                   double_quant: bool = True, in_features: Optional[int] = None) -> nn.Module:
    """The fake quantizer for ``grid``; ``blocksize`` is the group size of the dualbin grid
    (which also needs ``in_features``) and the absmax block of nf4/fp4."""
    if grid == "dualbin":
        if in_features is None:
            raise UsageError("the dualbin quantizer needs in_features")
        return DualBinFakeQuant(out_features, in_features, blocksize)
    if grid in LUT_GRIDS:
        return Lut4FakeQuant(grid, blocksize, double_quant)
    return IntFakeQuant(out_features, grid, bits)


def pack(quantizer: nn.Module, w: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> intk.IntKWeight:
    """The int-k packed form of ``quantizer(w)`` (int grids only)."""
    codes, step = quantizer.codes(w, alpha)
    dtype = str(w.dtype).removeprefix("torch.")
    return intk.from_codes(codes, step, quantizer.bits, quantizer.offset, quantizer.grid, dtype)
