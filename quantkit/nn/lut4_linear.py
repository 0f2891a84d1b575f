"""``Lut4Linear``: an nn.Linear replacement holding nf4/fp4 packed weights.

The packed tensors are plain buffers. ``state_dict()`` uses bitsandbytes' key layout
(``Linear4bit``), so a quantkit checkpoint can be read by bnb/transformers tooling:

    <p>weight                                  uint8 [(n+1)//2, 1]
    <p>weight.absmax                           fp32 [nb] | uint8 [nb] (double quant)
    <p>weight.quant_map                        fp32 [16]
    <p>weight.nested_absmax                    fp32 [ceil(nb/256)]   (double quant)
    <p>weight.nested_quant_map                 fp32 [256]            (double quant)
    <p>weight.quant_state.bitsandbytes__nf4    uint8 [len(json)]     (or __fp4)
    <p>bias                                    [out_features]        (if any)

Buffer attribute names cannot contain dots, so the hooks below translate between the
attributes (``weight``, ``weight_absmax``, …) and those keys.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import quantkit._ops  # noqa: F401  (registers torch.ops.quantkit)
from quantkit.errors import FormatError
from quantkit.formats import lut4
from quantkit.nn._packed_state import apply_keeping_dtypes, load_tensors

# attribute name -> suffix after "<prefix>weight" in the state dict
_TENSOR_KEYS = {
    "weight_absmax": ".absmax",
    "weight_quant_map": ".quant_map",
    "weight_nested_absmax": ".nested_absmax",
    "weight_nested_quant_map": ".nested_quant_map",
}


class Lut4Linear(nn.Module):
    """y = x @ dequant(W).T + b, with W stored as nf4/fp4 (bnb layout). x: [..., in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, state: lut4.Lut4State,
                 device: Optional[torch.device] = None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if tuple(state.shape) != (out_features, in_features):
            raise FormatError(f"quant state shape {state.shape} != ({out_features}, {in_features})")
        self.in_features = in_features
        self.out_features = out_features
        self.state = state
        n = out_features * in_features
        e = dict(device=device)
        self.register_buffer("weight", torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, **e))
        absmax_dtype = torch.uint8 if state.nested else torch.float32
        self.register_buffer("weight_absmax", torch.empty(state.n_blocks, dtype=absmax_dtype, **e))
        self.register_buffer("weight_quant_map", torch.empty(16, dtype=torch.float32, **e))
        if state.nested:
            self.register_buffer("weight_nested_absmax",
                                 torch.empty(state.n_nested_blocks, dtype=torch.float32, **e))
            self.register_buffer("weight_nested_quant_map", torch.empty(256, dtype=torch.float32, **e))
        else:
            self.weight_nested_absmax = None
            self.weight_nested_quant_map = None
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, **e), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True) -> "Lut4Linear":
        """Quantize an ``nn.Linear`` (its weight is read, never modified)."""
        q = lut4.quantize(linear.weight.data, quant_type, blocksize, double_quant)
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, q.state, device="cpu",
                  bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32)
        mod.weight = q.packed
        mod.weight_absmax = q.absmax
        mod.weight_quant_map = q.quant_map
        if q.state.nested:
            mod.weight_nested_absmax = q.nested_absmax
            mod.weight_nested_quant_map = q.nested_quant_map
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach().clone().cpu(), requires_grad=False)
        return mod

    # --- artifact metadata ------------------------------------------------------------------
    def spec(self) -> dict:
        """JSON-able description from which ``from_spec`` rebuilds an empty module."""
        s = self.state
        return {"format": lut4.FORMAT_NAME, "format_version": lut4.FORMAT_VERSION,
                "quant_type": s.quant_type, "blocksize": s.blocksize, "double_quant": s.nested,
                "in_features": self.in_features, "out_features": self.out_features,
                "dtype": s.dtype, "bias": self.bias is not None,
                "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None else None,
                "bits_per_weight": round(s.bits_per_weight(), 4)}

    @classmethod
    def from_spec(cls, spec: dict, device="meta") -> "Lut4Linear":
        try:
            state = lut4.Lut4State(spec["quant_type"], int(spec["blocksize"]),
                                   (int(spec["out_features"]), int(spec["in_features"])),
                                   spec["dtype"], bool(spec["double_quant"]))
            bias_dtype = getattr(torch, spec.get("bias_dtype") or "float32")
            return cls(state.shape[1], state.shape[0], bool(spec["bias"]), state, device=device,
                       bias_dtype=bias_dtype)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"bad lut4 module spec {spec}: {e}") from None

    def packed(self) -> lut4.Lut4Weight:
        """The packed tensors as a format object (shares storage)."""
        return lut4.Lut4Weight(self.weight, self.weight_absmax, self.weight_quant_map, self.state,
                               self.weight_nested_absmax, self.weight_nested_quant_map)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 [out_features, in_features] via the op (kernel where available)."""
        return torch.ops.quantkit.lut4_dequantize(*self._op_weight_args()[:3], self.state.blocksize,
                                                  self.out_features, self.in_features,
                                                  *self._op_weight_args()[3:])

    def _op_weight_args(self):
        s = self.state
        return (self.weight.view(-1), self.weight_absmax, self.weight_quant_map,
                self.weight_nested_quant_map, self.weight_nested_absmax,
                float(s.nested_offset), s.nested_blocksize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed, absmax, code, a_code, a_scale, a_off, a_bs = self._op_weight_args()
        bias = self.bias.to(x.dtype) if self.bias is not None and self.bias.dtype != x.dtype else self.bias
        return torch.ops.quantkit.lut4_linear(x, packed, absmax, code, self.state.blocksize,
                                              self.out_features, self.in_features, bias,
                                              a_code, a_scale, a_off, a_bs)

    def bound_forward(self):
        """``forward`` with the op overload and the packed arguments resolved once: a callable
        x -> y for a decode loop that calls this layer thousands of times while its tensors
        stay put (quantkit/runtime/lean_forward.py). Rebind after replacing a buffer."""
        packed, absmax, code, a_code, a_scale, a_off, a_bs = self._op_weight_args()
        op, bs, n, k, b = torch.ops.quantkit.lut4_linear.default, self.state.blocksize, self.out_features, \
            self.in_features, self.bias
        if b is None:
            return lambda x: op(x, packed, absmax, code, bs, n, k, None, a_code, a_scale, a_off, a_bs)
        return lambda x: op(x, packed, absmax, code, bs, n, k, b if b.dtype == x.dtype else b.to(x.dtype),
                            a_code, a_scale, a_off, a_bs)

    @staticmethod
    def bound_group(mods):
        """One callable x -> tuple of each module's output for modules taking the same input
        (q/k/v, gate/up): a single ``lut4_linear_multi`` call whose column blocks equal each
        module's forward. None when the group does not qualify (not all Lut4Linear, in_features
        differ, no native kernel, or tensors off the CPU)."""
        from quantkit import _ops

        if len(mods) < 2 or not all(type(m) is Lut4Linear for m in mods) or \
                len({m.in_features for m in mods}) != 1 or not _ops.has_native_cpu_kernel("lut4_linear_multi") or \
                any(m.weight.device.type != "cpu" for m in mods):
            return None
        args = [m._op_weight_args() for m in mods]
        packed, absmax, code, a_code, a_scale, a_off, a_bs = (list(v) for v in zip(*args))
        bs = [m.state.blocksize for m in mods]
        sizes = [m.out_features for m in mods]
        biases = [m.bias for m in mods]
        k, op = mods[0].in_features, torch.ops.quantkit.lut4_linear_multi.default

        def run(x):
            b = biases if all(v is None or v.dtype == x.dtype for v in biases) else \
                [v if v is None or v.dtype == x.dtype else v.to(x.dtype) for v in biases]
            return op(x, packed, absmax, code, bs, sizes, k, b, a_code, a_scale, a_off, a_bs).split(sizes, -1)
        return run

    def _apply(self, fn, recurse=True):
        """Device moves apply to every tensor; dtype casts (``model.to(torch.bfloat16)``,
        ``.half()``) only to the bias. The packed codes, scales and tables are the format
        itself and stay uint8/fp32, as in bitsandbytes."""
        return apply_keeping_dtypes(self, [n for n in ("weight", *_TENSOR_KEYS) if getattr(self, n) is not None],
                                    lambda: super(Lut4Linear, self)._apply(fn, recurse))

    def bits_per_weight(self) -> float:
        return self.state.bits_per_weight()

    def extra_repr(self) -> str:
        s = self.state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{s.quant_type}, blocksize={s.blocksize}, double_quant={s.nested}")

    # --- state dict in bitsandbytes' layout -----------------------------------------------
    def _quant_state_key(self) -> str:
        return f"weight.quant_state.bitsandbytes__{self.state.quant_type}"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        for attr, suffix in _TENSOR_KEYS.items():
            t = getattr(self, attr)
            if t is not None:
                destination[prefix + "weight" + suffix] = t if keep_vars else t.detach()
        blob = self.state.to_json().encode("utf-8")
        destination[prefix + self._quant_state_key()] = torch.tensor(list(blob), dtype=torch.uint8)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        qkey = prefix + self._quant_state_key()
        if qkey in state_dict:
            stored = lut4.Lut4State.from_json(bytes(state_dict[qkey].tolist()).decode("utf-8"))
            if (stored.quant_type, stored.blocksize, stored.shape, stored.nested) != (
                    self.state.quant_type, self.state.blocksize, self.state.shape, self.state.nested):
                error_msgs.append(f"{qkey}: stored quant state {stored} does not match module {self.state}")
                return
            self.state = stored  # carries nested_offset and the original dtype
        else:
            missing_keys.append(qkey)
        targets = {"weight": "weight", **{a: "weight" + s for a, s in _TENSOR_KEYS.items()}, "bias": "bias"}
        load_tensors(self, targets, state_dict, prefix, local_metadata, missing_keys, error_msgs)
        own = {prefix + "weight" + s for s in ("",) + tuple(_TENSOR_KEYS.values())} | {qkey, prefix + "bias"}
        for key in state_dict:
            if key.startswith(prefix) and key not in own and "." not in key[len(prefix):]:
                unexpected_keys.append(key)
