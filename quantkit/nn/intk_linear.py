"""``IntKLinear``: an nn.Linear replacement holding int-k packed weights (quantkit/formats/intk.py).

State dict (plain buffers, no translation):

    <p>weight        uint8 [out_features, ceil(in_features * bits / 8)]   packed codes
    <p>weight_scale  fp32 [out_features]                                  per-row step
    <p>bias          [out_features]                                       (if any)

bits / offset / grid are in the module's spec (artifact metadata), not in tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import quantkit._ops  # noqa: F401  (registers torch.ops.quantkit)
from quantkit.errors import FormatError
from quantkit.formats import intk
from quantkit.nn._packed_state import apply_keeping_dtypes


class IntKLinear(nn.Module):
    """y = x @ W.T + b, W[r, c] = (code - offset) * scale[r]. x: [..., in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, state: intk.IntKState,
                 device: Optional[torch.device] = None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if tuple(state.shape) != (out_features, in_features):
            raise FormatError(f"int-k state shape {state.shape} != ({out_features}, {in_features})")
        self.in_features = in_features
        self.out_features = out_features
        self.state = state
        self.register_buffer("weight", torch.empty((out_features, state.row_bytes), dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_packed(cls, q: intk.IntKWeight, bias: Optional[torch.Tensor] = None) -> "IntKLinear":
        n, k = q.state.shape
        mod = cls(k, n, bias is not None, q.state, device="cpu",
                  bias_dtype=bias.dtype if bias is not None else torch.float32)
        mod.weight = q.packed.contiguous()
        mod.weight_scale = q.scale.contiguous()
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return mod

    # --- artifact metadata ------------------------------------------------------------------
    def spec(self) -> dict:
        s = self.state
        return {"format": intk.FORMAT_NAME, "format_version": intk.FORMAT_VERSION, "bits": s.bits,
                "offset": s.offset, "grid": s.grid, "in_features": self.in_features,
                "out_features": self.out_features, "dtype": s.dtype, "bias": self.bias is not None,
                "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None else None,
                "bits_per_weight": round(s.bits_per_weight(), 4)}

    @classmethod
    def from_spec(cls, spec: dict, device="meta") -> "IntKLinear":
        try:
            if int(spec.get("format_version", 1)) > intk.FORMAT_VERSION:
                raise FormatError(f"int-k module format_version {spec['format_version']} is newer than this "
                                  f"quantkit reads ({intk.FORMAT_VERSION})")
            state = intk.IntKState(int(spec["bits"]), float(spec["offset"]), str(spec["grid"]),
                                   (int(spec["out_features"]), int(spec["in_features"])), spec["dtype"])
            bias_dtype = getattr(torch, spec.get("bias_dtype") or "float32")
            return cls(state.shape[1], state.shape[0], bool(spec["bias"]), state, device=device,
                       bias_dtype=bias_dtype)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"bad intk module spec {spec}: {e}") from None

    def packed(self) -> intk.IntKWeight:
        return intk.IntKWeight(self.weight, self.weight_scale, self.state)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 [out_features, in_features] via the op (kernel where available)."""
        s = self.state
        return torch.ops.quantkit.intk_dequantize(self.weight, self.weight_scale, s.bits, s.offset,
                                                  self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.state
        bias = self.bias.to(x.dtype) if self.bias is not None and self.bias.dtype != x.dtype else self.bias
        return torch.ops.quantkit.intk_linear(x, self.weight, self.weight_scale, s.bits, s.offset,
                                              self.out_features, self.in_features, bias)

    def bound_forward(self):
        """``forward`` with the op and its arguments resolved once (see Lut4Linear.bound_forward)."""
        s, w, sc, n, k, b = self.state, self.weight, self.weight_scale, self.out_features, self.in_features, self.bias
        op, bits, off = torch.ops.quantkit.intk_linear.default, s.bits, s.offset
        return lambda x: op(x, w, sc, bits, off, n, k, b if b is None or b.dtype == x.dtype else b.to(x.dtype))

    def _apply(self, fn, recurse=True):
        """Dtype casts apply to the bias only; packed codes (uint8) and scales (fp32) are the format."""
        return apply_keeping_dtypes(self, ("weight", "weight_scale"),
                                    lambda: super(IntKLinear, self)._apply(fn, recurse))

    def bits_per_weight(self) -> float:
        return self.state.bits_per_weight()

    def extra_repr(self) -> str:
        s = self.state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={s.bits}, grid={s.grid}")
