"""QATLinear in, packed module out, and the QATLinear a ``qat`` pass config makes of an
nn.Linear: what both the training API (quantkit/qat/api.py) and the recipe pass
(quantkit/passes/qat.py, compress = convert at once) build on. It imports neither of them, nor
the recipe or pass registry, so the pass never imports back into the table that lists it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from quantkit.qat.modules import QATLinear
from quantkit.qat.quantizers import DualBinFakeQuant, IntFakeQuant, Lut4FakeQuant, make_quantizer, pack


def qat_linear_for(linear: nn.Linear, cfg, start: int, end: Optional[int]) -> QATLinear:
    """A QATLinear wrapping ``linear`` with the quantizer ``cfg`` (a ``QATPassConfig``: grid,
    bits, blocksize, double_quant) asks for, fake-quantizing from step ``start`` to ``end``."""
    quantizer = make_quantizer(linear.out_features, cfg.grid, cfg.bits, cfg.blocksize, cfg.double_quant,
                               in_features=linear.in_features)
    quantizer.to(device=linear.weight.device)
    return QATLinear(linear, quantizer, start, end)


@torch.no_grad()
def convert_module(m: QATLinear) -> nn.Module:
    """The packed module for one QATLinear: IntKLinear (int grids), Lut4Linear (nf4/fp4) or
    DualBinLinear (dual binary)."""
    from quantkit.nn.intk_linear import IntKLinear
    from quantkit.nn.lut4_linear import Lut4Linear
    from quantkit.qat.modules import FROZEN

    frozen = int(m.phase) == FROZEN
    w = m.frozen_weight if frozen else m.weight
    q = m.quantizer
    if not bool(q.initialized):
        q.init_scale(w)  # QAT never started: round-to-nearest with the initial scales
    bias = m.bias
    if isinstance(q, Lut4FakeQuant):
        lin = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(w.detach().cpu(), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach().cpu(), requires_grad=False)
        return Lut4Linear.from_linear(lin, q.grid, q.blocksize, q.double_quant)
    if isinstance(q, DualBinFakeQuant):
        from quantkit.nn.dualbin_linear import DualBinLinear

        packed = q.pack(w, m.frozen_alpha if frozen else None)
        return DualBinLinear.from_packed(packed, None if bias is None else bias.detach().cpu())
    assert isinstance(q, IntFakeQuant)
    packed = pack(q, w, m.frozen_alpha if frozen else None)
    return IntKLinear.from_packed(packed, None if bias is None else bias.detach().cpu())
