"""Helpers shared by the packed modules (Lut4Linear, IntKLinear, DualBinLinear, BitStackLinear).

Two things every packed module does the same way:
- dtype casts (``model.half()``, ``.to(torch.bfloat16)``) must not touch the packed tensors,
  whose dtypes are the format itself; device moves must.
- state-dict loading under custom key names (``weight.absmax``, ``weight.plane1``, ...): each
  tensor is checked for shape and dtype, then assigned (``load_state_dict(assign=True)``,
  how artifacts load) or copied in place; the bias stays a frozen Parameter.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn


def apply_keeping_dtypes(module: nn.Module, names: Iterable[str], apply: Callable[[], nn.Module]) -> nn.Module:
    """Run ``apply()`` (the module's ``super()._apply``), then undo any dtype change of the
    tensors ``names`` while keeping their new device. Returns ``module``."""
    fixed = {n: getattr(module, n) for n in names}
    apply()
    for name, before in fixed.items():
        after = getattr(module, name)
        if after.dtype != before.dtype:
            setattr(module, name, before.to(after.device))
    return module


def load_tensors(module: nn.Module, keys: dict, state_dict: dict, prefix: str, local_metadata: dict,
                 missing_keys: list, error_msgs: list,
                 adapt: Optional[Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> None:
    """Load ``state_dict[prefix + key]`` into attribute ``attr`` for each ``attr: key`` in ``keys``.

    Attributes that are None (no bias) are skipped; a missing key goes to ``missing_keys``; a
    shape or dtype mismatch to ``error_msgs`` (naming both); ``adapt(attr, value, current)``
    may first reshape a stored value (e.g. take a prefix of a BitStack stack). "bias" is kept
    a frozen ``nn.Parameter``; other attributes are buffers.
    """
    assign = bool(local_metadata.get("assign_to_params_buffers", False))
    for attr, key in keys.items():
        current = getattr(module, attr)
        if current is None:
            continue
        full = prefix + key
        if full not in state_dict:
            missing_keys.append(full)
            continue
        value = state_dict[full]
        if adapt is not None:
            value = adapt(attr, value, current)
        if value.shape != current.shape or value.dtype != current.dtype:
            error_msgs.append(f"{full}: expected {current.dtype} {list(current.shape)}, "
                              f"got {value.dtype} {list(value.shape)}")
            continue
        if attr == "bias":
            if assign:
                module.bias = nn.Parameter(value, requires_grad=False)
            else:
                with torch.no_grad():
                    module.bias.copy_(value)
        elif assign:
            setattr(module, attr, value)
        else:
            current.copy_(value)
