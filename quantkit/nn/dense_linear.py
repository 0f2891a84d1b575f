"""``DenseLinear``: an nn.Linear whose weight is stored and held narrower than the model.

For the output head (and, through ``DenseEmbedding``, the token embedding) of a model that
computes in fp32: the weight lives in bf16 or fp16 (half the bytes of fp32) and each call
widens it to the activations' dtype, so an fp32 model gets y = x @ W.float().T + b with W
rounded once to the storage dtype. State dict: ``<p>weight`` [out_features, in_features]
in the storage dtype, ``<p>bias`` (if any).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from quantkit._row_chunks import dense_linear_by_rows
from quantkit.errors import FormatError
from quantkit.nn._packed_state import apply_keeping_dtypes, load_tensors

FORMAT_NAME = "dense"
FORMAT_VERSION = 1
DTYPES = ("bfloat16", "float16")


class DenseLinear(nn.Module):
    """y = x @ W.to(x.dtype).T + b; W held in ``dtype`` (bf16/fp16). x: [..., in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str,
                 device: Optional[torch.device] = None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if dtype not in DTYPES:
            raise FormatError(f"dense storage dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.storage_dtype = dtype
        self.register_buffer("weight", torch.empty((out_features, in_features), dtype=getattr(torch, dtype),
                                                   device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, dtype: str, bias: Optional[torch.Tensor] = None) -> "DenseLinear":
        """Round ``weight`` [out, in] to ``dtype`` once (the source tensor is not modified)."""
        n, k = weight.shape
        mod = cls(k, n, bias is not None, dtype, device="cpu",
                  bias_dtype=bias.dtype if bias is not None else torch.float32)
        mod.weight = weight.detach().to(getattr(torch, dtype)).contiguous().cpu()
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone().cpu(), requires_grad=False)
        return mod

    def spec(self) -> dict:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "dtype": self.storage_dtype,
                "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None else None,
                "bits_per_weight": 16.0}

    @classmethod
    def from_spec(cls, spec: dict, device="meta"):
        try:
            if int(spec.get("format_version", 1)) > FORMAT_VERSION:
                raise FormatError(f"dense module format_version {spec['format_version']} is newer than this "
                                  f"quantkit reads ({FORMAT_VERSION})")
            bias_dtype = getattr(torch, spec.get("bias_dtype") or "float32")
            return cls(int(spec["in_features"]), int(spec["out_features"]), bool(spec["bias"]), str(spec["dtype"]),
                       device=device, bias_dtype=bias_dtype)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"bad {spec.get('format', FORMAT_NAME)} module spec {spec}: {e}") from None

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None and self.bias.dtype != x.dtype else self.bias
        if torch.is_grad_enabled() and (self.training or x.requires_grad or (bias is not None and bias.requires_grad)):
            # training through this layer (e.g. LoRA): F.linear makes a widened copy of all of W
            # (kept until the backward when x needs a gradient); this widens a few hundred rows
            # at a time in both passes (same values up to summation order; tools/bench_lora_memory.py)
            return dense_linear_by_rows(x, self.weight, bias)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def bound_forward(self):
        """``forward`` as a callable (named explicitly: a table subclass's own forward is a lookup)."""
        return lambda x: DenseLinear.forward(self, x)

    def _apply(self, fn, recurse=True):
        """Dtype casts apply to the bias only: the weight's dtype is the stored format."""
        return apply_keeping_dtypes(self, ("weight",), lambda: super(DenseLinear, self)._apply(fn, recurse))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        load_tensors(self, {"weight": "weight", "bias": "bias"}, state_dict, prefix, local_metadata, missing_keys,
                     error_msgs)

    def bits_per_weight(self) -> float:
        return 16.0

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.storage_dtype}")
