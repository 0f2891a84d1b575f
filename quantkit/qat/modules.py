"""``QATLinear``: an nn.Linear whose weight is fake-quantized once QAT has started.

It keeps the original linear's ``weight`` and ``bias`` Parameters (the same objects), so an
optimizer built before or after ``prepare`` trains them, and adds the quantizer's scale α
(``quantizer.alpha``, int grids only). Phases, set by ``quantkit.qat.step``:

    0  full precision (before ``start``): y = x @ W.T + b
    1  QAT ([start, end)): y = x @ Ŵ.T + b, Ŵ = quantizer(W) with straight-through gradients;
       α is initialised from W at the switch (not at prepare time: FP training moves W)
    2  frozen (after ``end``): Ŵ is the quantized weight at the moment of ``end``; later
       optimizer steps no longer change it (snapshot buffers ``frozen_weight`` / ``frozen_alpha``)

Under DistributedDataParallel every parameter must take part in each backward; in phases 0
and 2 the unused ones (α; W and α when frozen) are tied into the output with a zero weight
when torch.distributed is initialised, so DDP needs no ``find_unused_parameters``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

FP, QAT, FROZEN = 0, 1, 2


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class QATLinear(nn.Module):
    """y = x @ W.T + b with W fake-quantized from ``start`` on. x: [..., in_features]."""

    def __init__(self, linear: nn.Linear, quantizer: nn.Module, start: int, end: Optional[int]):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.quantizer = quantizer
        self.start = int(start)
        self.end = None if end is None else int(end)
        self.register_buffer("phase", torch.zeros((), dtype=torch.uint8))
        self.register_buffer("frozen_weight", None)
        self.register_buffer("frozen_alpha", None)

    # --- phase control (quantkit.qat.step) ------------------------------------------------
    def phase_for(self, step: int) -> int:
        if step < self.start:
            return FP
        if self.end is not None and step >= self.end:
            return FROZEN
        return QAT

    @torch.no_grad()
    def set_step(self, step: int) -> int:
        """Switch phase for training step ``step``; returns the new phase."""
        new = self.phase_for(step)
        old = int(self.phase)
        if new != FP and not bool(self.quantizer.initialized):
            self.quantizer.init_scale(self.weight)
        if new == FROZEN and old != FROZEN:
            self.register_buffer("frozen_weight", self.weight.detach().clone())
            alpha = getattr(self.quantizer, "alpha", None)
            self.register_buffer("frozen_alpha", None if alpha is None else alpha.detach().clone())
        if new != FROZEN and old == FROZEN:
            self.frozen_weight = self.frozen_alpha = None
        self.phase.fill_(new)
        return new

    # --- forward ----------------------------------------------------------------------------
    def quantized_weight(self) -> torch.Tensor:
        """Ŵ as the module uses it in its current phase (initialising α if needed)."""
        if int(self.phase) == FROZEN:
            with torch.no_grad():
                return self.quantizer(self.frozen_weight, self.frozen_alpha)
        if not bool(self.quantizer.initialized):
            self.quantizer.init_scale(self.weight)
        return self.quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phase = int(self.phase)
        w = self.weight if phase == FP else self.quantized_weight()
        y = F.linear(x, w, self.bias)
        if phase != QAT and self.training and _distributed():
            unused = [p for p in self.quantizer.parameters()]
            if phase == FROZEN:
                unused += [self.weight] + ([self.bias] if self.bias is not None else [])
            y = y + sum(p.sum() for p in unused) * 0.0
        return y

    # --- checkpoints: frozen snapshots exist only after ``end`` ------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in ("frozen_weight", "frozen_alpha"):
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                self.register_buffer(name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"start={self.start}, end={self.end}, phase={['fp', 'qat', 'frozen'][int(self.phase)]}")
