"""ONNX forms of the formats that have no ONNX Runtime contrib op: a standard-op graph.

For int-k (other than 4-bit codes centred at 8), dual-binary (DB-LLM) and BitStack layers
the export-time module keeps the packed tensors as they are stored (so the .onnx file
stays near the artifact's packed size) and its forward decodes them with the same fp32
arithmetic as the format's pure-torch reference (written with ops the ONNX exporter
translates), followed by a MatMul:

    int-k     packed uint8 [N, ceil(K*bits/8)] --BitShift/BitwiseAnd--> bits --(Mul, ReduceSum)-->
              codes --(Sub offset, Mul scale[N])--> W fp32 [N, K] --MatMul--> y
    dualbin   plane1/plane2 uint8 [N, G*group/8] --BitShift/BitwiseAnd--> {0,1} planes -->
              W = alpha1*b1 + alpha2*b2 (alphas fp16 -> fp32) --MatMul--> y
    bitstack  signs uint8 [b, m, ceil(n/8)] --> ±1 planes; W = Σ_i S_i ⊙ (u_i v_i) (u, v fp16, or int8 × scale
              -> fp32) --MatMul--> y

The dequantize runs inside the graph on every call (ONNX Runtime constant-folds nothing
that depends only on initializers unless asked to, and we do not ask: folding would write
the dense fp32 weight into the file). That is slower than a fused kernel but exact: the
graph computes the same fp32 weight as quantkit's reference, so logits agree up to the
MatMul's summation order. Int-k with 4-bit codes and offset 8 (the LSQ int4 grid) instead
becomes ``com.microsoft::MatMulNBits`` (onnx_export.py), which ONNX Runtime runs fused.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


class DequantMatMul(nn.Module):
    """y = x @ dequantize(*buffers).T + bias, with ``dequantize`` a pure-torch reference.

    buffers: the format's packed tensors, registered under ``names`` (kept as stored);
    consts: the non-tensor arguments passed after them; bias fp32 [N] or None.
    """

    def __init__(self, dequantize: Callable, names: tuple, tensors: tuple, consts: tuple,
                 bias: Optional[torch.Tensor]):
        super().__init__()
        self._dequantize, self._names, self._consts = dequantize, names, consts
        for name, t in zip(names, tensors):
            self.register_buffer(name, t.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._dequantize(*(getattr(self, n) for n in self._names), *self._consts)
        y = x.float() @ w.T
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


def _bits(packed: torch.Tensor, msb_first: bool) -> torch.Tensor:
    """uint8 [..., B] -> fp32 {0, 1} [..., B*8]: bit t of each byte (t = 0 first, or 7 first).

    Written with integer Div and Mod rather than shifts: the ONNX exporter has no
    translation for a shift of int32 by int64 (aten.__rshift__.Tensor), while Div/Mod on
    non-negative int32 are exact and run everywhere."""
    t = torch.arange(8, device=packed.device, dtype=torch.int32)
    pow2 = torch.pow(2, (7 - t) if msb_first else t).to(torch.int32)
    bits = (packed.to(torch.int32).unsqueeze(-1) // pow2) % 2
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8).to(torch.float32)


def _intk_weight(packed, scale, bits: int, offset: float, rows: int, cols: int):
    """W = (code - offset) * scale[row], codes LSB-first bit streams per row (formats/intk.py)."""
    stream = _bits(packed, msb_first=False)[:, :cols * bits].reshape(rows, cols, bits)
    place = torch.pow(2.0, torch.arange(bits, device=packed.device, dtype=torch.float32))
    codes = (stream * place).sum(-1)  # exact: integers < 256 in fp32
    return (codes - offset) * scale.reshape(rows, 1)


def _dualbin_weight(plane1, plane2, alpha1, alpha2, group: int, rows: int, cols: int):
    """W = alpha1*b1 + alpha2*b2 per group of K, planes LSB-first (formats/dualbin.py)."""
    g = alpha1.shape[1]
    b1 = _bits(plane1, msb_first=False).reshape(rows, g, group)
    b2 = _bits(plane2, msb_first=False).reshape(rows, g, group)
    w = alpha1.float().unsqueeze(-1) * b1 + alpha2.float().unsqueeze(-1) * b2
    return w.reshape(rows, g * group)[:, :cols]


def _bitstack_weight(signs, u, v):
    """W = Σ_i S_i ⊙ (u_i v_i), signs MSB-first per row, bit 1 = +1 (formats/bitstack.py)."""
    n = v.shape[2]
    s = _bits(signs, msb_first=True)[..., :n] * 2.0 - 1.0
    return (s * torch.bmm(u.float(), v.float())).sum(0)


def _bitstack_int8_weight(signs, u, v, scale):
    """The same with int8 factors: u_i's component j times scale[i, j]."""
    return _bitstack_weight(signs, u.float() * scale.unsqueeze(1), v)


def intk_graph(module) -> nn.Module:
    s = module.state
    return DequantMatMul(_intk_weight, ("packed", "scale"), (module.weight, module.weight_scale),
                         (s.bits, float(s.offset), module.out_features, module.in_features), module.bias)


def dualbin_graph(module) -> nn.Module:
    names = ("plane1", "plane2", "alpha1", "alpha2")
    tensors = (module.weight_plane1, module.weight_plane2, module.weight_alpha1, module.weight_alpha2)
    return DequantMatMul(_dualbin_weight, names, tensors,
                         (module.state.group, module.out_features, module.in_features), module.bias)


def bitstack_graph(module) -> nn.Module:
    p = module.packed()  # the blocks this model holds (all, or those a memory budget loaded)
    if p.scale is not None:
        return DequantMatMul(_bitstack_int8_weight, ("signs", "u", "v", "scale"), (p.signs, p.u, p.v, p.scale), (),
                             module.bias)
    return DequantMatMul(_bitstack_weight, ("signs", "u", "v"), (p.signs, p.u, p.v), (), module.bias)
