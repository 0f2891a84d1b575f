"""``DualBinLinear``: an nn.Linear replacement holding DB-LLM dual-binarized weights.

State-dict keys (attribute ``weight_planeN`` is stored as ``<prefix>weight.planeN`` etc.,
so the artifact code and ``quantkit inspect`` see them as the layer's packed weight):

    <p>weight.plane1   uint8 [N, G*group/8]   first binary plane, LSB first along K
    <p>weight.plane2   uint8 [N, G*group/8]   second binary plane
    <p>weight.alpha1   fp16  [N, G]           scale of plane 1 per group
    <p>weight.alpha2   fp16  [N, G]           scale of plane 2 per group
    <p>bias            [N]                    (if any)

with G = ceil(K / group). See quantkit/formats/dualbin.py and docs/format.md.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import quantkit._ops  # noqa: F401  (registers torch.ops.quantkit)
from quantkit.errors import FormatError
from quantkit.formats import dualbin
from quantkit.nn._packed_state import apply_keeping_dtypes, load_tensors

_BUFFERS = ("weight_plane1", "weight_plane2", "weight_alpha1", "weight_alpha2")


class DualBinLinear(nn.Module):
    """y = x @ (alpha1*b1 + alpha2*b2).T + b. x: [..., in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, state: dualbin.DualBinState,
                 device: Optional[torch.device] = None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if tuple(state.shape) != (out_features, in_features):
            raise FormatError(f"dualbin state shape {state.shape} != ({out_features}, {in_features})")
        self.in_features = in_features
        self.out_features = out_features
        self.state = state
        e = dict(device=device)
        for name in ("weight_plane1", "weight_plane2"):
            self.register_buffer(name, torch.empty((out_features, state.row_bytes), dtype=torch.uint8, **e))
        for name in ("weight_alpha1", "weight_alpha2"):
            self.register_buffer(name, torch.empty((out_features, state.n_groups), dtype=torch.float16, **e))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, **e), requires_grad=False) if bias else None

    @classmethod
    def from_packed(cls, q: dualbin.DualBinWeight, bias: Optional[torch.Tensor] = None) -> "DualBinLinear":
        n, k = q.state.shape
        mod = cls(k, n, bias is not None, q.state, device="cpu",
                  bias_dtype=bias.dtype if bias is not None else torch.float32)
        mod.weight_plane1, mod.weight_plane2 = q.plane1, q.plane2
        mod.weight_alpha1, mod.weight_alpha2 = q.alpha1, q.alpha2
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone().cpu(), requires_grad=False)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int = 64, init: str = "mse") -> "DualBinLinear":
        """FDB-initialise an ``nn.Linear`` (2-bit RTN on the {-1,0,1,2}·s grid; no training)."""
        return cls.from_packed(dualbin.quantize(linear.weight.data, group, init), linear.bias)

    # --- artifact metadata ------------------------------------------------------------------
    def spec(self) -> dict:
        """JSON-able description from which ``from_spec`` rebuilds an empty module."""
        s = self.state
        return {"format": dualbin.FORMAT_NAME, "format_version": dualbin.FORMAT_VERSION,
                "quant_type": f"w2g{s.group}", "group": s.group,
                "in_features": self.in_features, "out_features": self.out_features,
                "dtype": s.dtype, "bias": self.bias is not None,
                "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None else None,
                "bits_per_weight": round(s.bits_per_weight(), 4)}

    @classmethod
    def from_spec(cls, spec: dict, device="meta") -> "DualBinLinear":
        try:
            if int(spec.get("format_version", 0)) != dualbin.FORMAT_VERSION:
                raise ValueError(f"format_version {spec.get('format_version')} is not {dualbin.FORMAT_VERSION}")
            state = dualbin.DualBinState((int(spec["out_features"]), int(spec["in_features"])),
                                         int(spec["group"]), spec["dtype"])
            bias_dtype = getattr(torch, spec.get("bias_dtype") or "float32")
            return cls(state.shape[1], state.shape[0], bool(spec["bias"]), state, device=device,
                       bias_dtype=bias_dtype)
        except (KeyError, TypeError, ValueError, AttributeError, FormatError) as e:
            raise FormatError(f"bad dualbin module spec {spec}: {e}") from None

    def packed(self) -> dualbin.DualBinWeight:
        """The packed tensors as a format object (shares storage)."""
        return dualbin.DualBinWeight(self.weight_plane1, self.weight_plane2, self.weight_alpha1,
                                     self.weight_alpha2, self.state)

    @property
    def qweight(self) -> torch.Tensor:
        """The first bit plane (read-only alias). Tools that place adapters next to a
        quantized layer look for ``weight`` or ``qweight`` to find its device (peft's LoRA
        injection fails on a layer with neither and no parameter, e.g. without a bias)."""
        return self.weight_plane1

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 [out_features, in_features] via the op (kernel where available)."""
        return torch.ops.quantkit.dualbin_dequantize(*(getattr(self, b) for b in _BUFFERS), self.state.group,
                                                     self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None and self.bias.dtype != x.dtype else self.bias
        return torch.ops.quantkit.dualbin_linear(x, *(getattr(self, b) for b in _BUFFERS), self.state.group,
                                                 self.out_features, self.in_features, bias)

    def bound_forward(self):
        """``forward`` with the op and its arguments resolved once (see Lut4Linear.bound_forward)."""
        bufs, g, n, k, b = tuple(getattr(self, name) for name in _BUFFERS), self.state.group, self.out_features, \
            self.in_features, self.bias
        op = torch.ops.quantkit.dualbin_linear.default
        return lambda x: op(x, *bufs, g, n, k, b if b is None or b.dtype == x.dtype else b.to(x.dtype))

    def _apply(self, fn, recurse=True):
        """Device moves apply to every tensor; dtype casts (``.half()``, ``.to(bf16)``) only to
        the bias: the planes and fp16 scales are the format itself."""
        return apply_keeping_dtypes(self, _BUFFERS,
                                    lambda: super(DualBinLinear, self)._apply(fn, recurse))

    def bits_per_weight(self) -> float:
        return self.state.bits_per_weight()

    # --- state dict: attribute weight_X <-> key weight.X (buffer names cannot hold dots) ----
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for attr in _BUFFERS:
            t = getattr(self, attr)
            destination[prefix + attr.replace("_", ".", 1)] = t if keep_vars else t.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = {a: a.replace("_", ".", 1) for a in _BUFFERS}
        if self.bias is not None:
            keys["bias"] = "bias"
        load_tensors(self, keys, state_dict, prefix, local_metadata, missing_keys, error_msgs)
        own = {prefix + s for s in keys.values()}
        for key in state_dict:
            rest = key[len(prefix):]
            if key.startswith(prefix) and key not in own and (rest.startswith("weight.") or "." not in rest):
                unexpected_keys.append(key)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dualbin w2 group={self.state.group}")
