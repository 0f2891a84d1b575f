"""``BitStackLinear``: an nn.Linear replacement holding the first ``n_loaded`` BitStack blocks.

State dict of a module with prefix ``p`` (b = blocks held, m = out, n = in, k = rank):

    p.weight        uint8 [b, m, ceil(n/8)]  sign bits, MSB first per row (formats/bitstack.py)
    p.weight.u      fp16  [b, m, k]          (int8 with factor_dtype "int8")
    p.weight.v      fp16  [b, k, n]          (int8 with factor_dtype "int8")
    p.weight.scale  fp32  [b, k]             (only with factor_dtype "int8")
    p.bias          [m]                      (if any)

An artifact stores every block (b = n_blocks); ``quantkit.load(OUT, memory_budget=...)``
builds the module with fewer blocks and reads only the first rows of those tensors
(quantkit/io/bitstack_budget.py). The module's ``spec()`` also carries this module's
positions in the model-wide block order (``order``), from which a budget is turned into
blocks per layer.

The activation scale of the BitStack pass is folded into the previous op, so forward is
plain ``x @ Ŵᵀ + bias``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import quantkit._ops  # noqa: F401  (registers torch.ops.quantkit)
from quantkit.errors import FormatError
from quantkit.formats import bitstack
from quantkit.nn._packed_state import apply_keeping_dtypes, load_tensors

_KEYS = {"signs": "weight", "u": "weight.u", "v": "weight.v"}
_SCALE_KEY = {"scale": "weight.scale"}  # int8 factors only


class BitStackLinear(nn.Module):
    """y = x @ Ŵᵀ + b with Ŵ = Σ_{i<n_loaded} S_i ⊙ (u_i v_i). x: [..., in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, n_blocks: int,
                 n_loaded: Optional[int] = None, order: Optional[list[int]] = None,
                 device: Optional[torch.device] = None, bias_dtype: torch.dtype = torch.float32,
                 factor_dtype: str = "float16"):
        super().__init__()
        if factor_dtype not in bitstack.FACTOR_DTYPES:
            raise FormatError(f"BitStackLinear factor_dtype must be one of {', '.join(bitstack.FACTOR_DTYPES)}, "
                              f"got {factor_dtype!r}")
        n_loaded = n_blocks if n_loaded is None else n_loaded
        if not (rank >= 1 and 1 <= n_loaded <= n_blocks):
            raise FormatError(f"BitStackLinear needs rank >= 1 and 1 <= n_loaded <= n_blocks, got rank {rank}, "
                              f"n_loaded {n_loaded}, n_blocks {n_blocks}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.n_blocks, self.n_loaded = rank, n_blocks, n_loaded
        self.factor_dtype = factor_dtype
        fdt = torch.int8 if factor_dtype == "int8" else torch.float16
        # order[i-1] = global position of block i (i >= 1) in the model-wide order (None: unranked)
        self.order = list(order) if order is not None else None
        e = dict(device=device)
        self.register_buffer("signs", torch.empty((n_loaded, out_features, (in_features + 7) // 8),
                                                  dtype=torch.uint8, **e))
        self.register_buffer("u", torch.empty((n_loaded, out_features, rank), dtype=fdt, **e))
        self.register_buffer("v", torch.empty((n_loaded, rank, in_features), dtype=fdt, **e))
        self.register_buffer("scale", torch.empty((n_loaded, rank), dtype=torch.float32, **e)
                             if factor_dtype == "int8" else None)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, **e), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], n_blocks: int, rank: int,
                    svd: str = "exact", seed: int = 0, hessian: Optional[torch.Tensor] = None,
                    damp: float = 0.01, factor_dtype: str = "float16", sign_sweeps: int = 0) -> "BitStackLinear":
        """Decompose ``weight`` [out, in] (already scaled by the pass) into a full stack;
        ``hessian`` [in, in] (optional): input Gram for error-feedback signs; ``factor_dtype``
        "float16" or "int8"; ``sign_sweeps``: coordinate-descent sweeps after the feedback
        (``bitstack.quantize``)."""
        q = bitstack.quantize(weight, n_blocks, rank, svd, seed, hessian=hessian, damp=damp,
                              factor_dtype=factor_dtype, sign_sweeps=sign_sweeps)
        m, n = weight.shape
        mod = cls(n, m, bias is not None, q.rank, n_blocks, device="cpu",
                  bias_dtype=bias.dtype if bias is not None else torch.float32, factor_dtype=factor_dtype)
        mod.signs, mod.u, mod.v = q.signs, q.u, q.v
        if q.scale is not None:
            mod.scale = q.scale
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone().cpu(), requires_grad=False)
        return mod

    # --- blocks and memory -------------------------------------------------------------------
    def block_bytes(self) -> int:
        return bitstack.block_bytes(self.out_features, self.in_features, self.rank, self.factor_dtype)

    def set_loaded(self, b: int) -> None:
        """Use only the first ``b`` of the blocks held (views; used by the pass's ranking)."""
        if not 1 <= b <= self.signs.shape[0]:
            raise FormatError(f"{b} blocks requested but this module holds {self.signs.shape[0]}")
        self.n_loaded = b

    def packed(self) -> bitstack.BitStackBlocks:
        b = self.n_loaded
        return bitstack.BitStackBlocks(self.signs[:b], self.u[:b], self.v[:b],
                                       None if self.scale is None else self.scale[:b])

    @property
    def qweight(self) -> torch.Tensor:
        """The sign bits (read-only alias). Tools that place adapters next to a quantized
        layer look for ``weight`` or ``qweight`` to find its device (peft's LoRA injection
        fails on a layer with neither and no parameter, e.g. without a bias)."""
        return self.signs

    def dequantized_weight(self) -> torch.Tensor:
        p = self.packed()
        return torch.ops.quantkit.bitstack_dequantize(p.signs, p.u, p.v, p.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.packed()
        bias = self.bias.to(x.dtype) if self.bias is not None and self.bias.dtype != x.dtype else self.bias
        return torch.ops.quantkit.bitstack_linear(x, p.signs, p.u, p.v, bias, p.scale)

    def _apply(self, fn, recurse=True):
        """Device moves apply to every tensor; dtype casts only to the bias (the blocks are the
        format: uint8 signs, fp16 or int8 factors, fp32 scale)."""
        return apply_keeping_dtypes(self, ("signs", "u", "v") + (("scale",) if self.scale is not None else ()),
                                    lambda: super(BitStackLinear, self)._apply(fn, recurse))

    def bits_per_weight(self) -> float:
        return 8 * self.n_loaded * self.block_bytes() / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, blocks={self.n_loaded}/{self.n_blocks}, factors={self.factor_dtype}")

    # --- artifact metadata -------------------------------------------------------------------
    def spec(self) -> dict:
        # fp16-factor stacks stay format version 1 (readable by older quantkit); int8 needs 2
        extra = {"factor_dtype": "int8"} if self.factor_dtype == "int8" else {}
        return {"format": bitstack.FORMAT_NAME, "format_version": 2 if extra else 1, **extra,
                "in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "n_blocks": self.n_loaded, "order": self.order[:self.n_loaded - 1] if self.order else None,
                "block_bytes": self.block_bytes(), "bias": self.bias is not None,
                "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None else None,
                "bits_per_weight": round(self.bits_per_weight(), 4)}

    @classmethod
    def from_spec(cls, spec: dict, device="meta", n_loaded: Optional[int] = None) -> "BitStackLinear":
        try:
            if int(spec["format_version"]) > bitstack.FORMAT_VERSION:
                raise FormatError(f"bitstack format version {spec['format_version']} is newer than this quantkit")
            bias_dtype = getattr(torch, spec.get("bias_dtype") or "float32")
            return cls(int(spec["in_features"]), int(spec["out_features"]), bool(spec["bias"]), int(spec["rank"]),
                       int(spec["n_blocks"]), n_loaded=n_loaded, order=spec.get("order"), device=device,
                       bias_dtype=bias_dtype, factor_dtype=spec.get("factor_dtype", "float16"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"bad bitstack module spec {spec}: {e}") from None

    def _keys(self) -> dict:
        return {**_KEYS, **(_SCALE_KEY if self.scale is not None else {})}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for attr, key in self._keys().items():
            t = getattr(self.packed(), attr)
            destination[prefix + key] = t if keep_vars else t.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        def prefix_of_stack(attr, value, current):
            if attr != "bias" and value.dim() == current.dim() and value.shape[0] > current.shape[0]:
                value = value[:current.shape[0]]  # a full stack loaded into a module holding fewer blocks
            return value if attr == "bias" else value.contiguous()

        load_tensors(self, {**self._keys(), "bias": "bias"}, state_dict, prefix, local_metadata, missing_keys, error_msgs,
                     adapt=prefix_of_stack)
        own = {prefix + k for k in self._keys().values()} | {prefix + "bias"}
        for key in state_dict:
            if key.startswith(prefix) and key not in own and "." not in key[len(prefix):]:
                unexpected_keys.append(key)
