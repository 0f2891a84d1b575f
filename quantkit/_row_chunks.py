"""grad_x = grad_y @ W for a packed weight W, without a dense copy of the whole of W.

The backward of every packed linear op (``quantkit/_ops.py``) must give the input gradient
grad_x [M, in] = grad_y [M, out] @ W [out, in], W the dequantized weight. Dequantizing W
whole would hold an fp32 copy of the layer (4 bytes/weight, 8x an nf4 layer) in every
backward of a LoRA fine-tune on a packed base. Instead rows [r0, r1) of W are dequantized a
chunk at a time and grad_x accumulates grad_y[:, r0:r1] @ W[r0:r1], so the extra memory of
a backward is one chunk, ``chunk_rows() x in`` fp32 (256 rows x 4096 in = 4 MiB), whatever
the layer's size.

The row dequantizers below take the same packed tensors as the ops and call the ops'
``*_dequantize`` on a slice (the native kernel where there is one): rows of int-k,
dual-binary and BitStack weights are independent; nf4/fp4 blocks run over the flattened
weight, so a chunk of rows is decoded from the block boundary before it (at most
``blocksize`` extra elements) with the block scales decoded once per backward (fp32
[n / blocksize], 1/64 of W's elements at block 64).

``QUANTKIT_GRAD_CHUNK_ROWS`` (default 256) sets the chunk; ``grad_chunk_rows(n)`` sets it
for a ``with`` block (tests use small chunks on tiny layers).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

CHUNK_ROWS_ENV = "QUANTKIT_GRAD_CHUNK_ROWS"
DEFAULT_CHUNK_ROWS = 256

# rows of W per chunk; read once at import, changed only through grad_chunk_rows()
_chunk_rows = int(os.environ.get(CHUNK_ROWS_ENV, DEFAULT_CHUNK_ROWS) or DEFAULT_CHUNK_ROWS)
if _chunk_rows < 1:
    raise ValueError(f"{CHUNK_ROWS_ENV} must be a positive number of rows, got {_chunk_rows}")

# (r0, r1) -> fp32 [r1 - r0, in] rows r0..r1-1 of the dequantized weight
DequantRows = Callable[[int, int], torch.Tensor]


def chunk_rows() -> int:
    """Rows of W dequantized at a time by the packed ops' backward."""
    return _chunk_rows


@contextmanager
def grad_chunk_rows(rows: int) -> Iterator[None]:
    """Use ``rows`` rows per chunk inside the block (process-wide, not thread-local)."""
    global _chunk_rows
    if int(rows) < 1:
        raise ValueError(f"chunk rows must be >= 1, got {rows}")
    old, _chunk_rows = _chunk_rows, int(rows)
    try:
        yield
    finally:
        _chunk_rows = old


def row_chunks(out_features: int) -> Iterator[tuple[int, int]]:
    """(r0, r1) for every chunk of ``chunk_rows()`` rows of an [out_features, *] weight."""
    step = _chunk_rows
    for r0 in range(0, out_features, step):
        yield r0, min(out_features, r0 + step)


def grad_input_by_rows(grad: torch.Tensor, out_features: int, in_features: int, dequant_rows: DequantRows,
                       x_dtype: torch.dtype) -> torch.Tensor:
    """grad [..., out] (any float dtype) -> grad_x [..., in] in ``x_dtype``, = grad.float() @ W
    accumulated in fp32 over row chunks of W (never all of W at once)."""
    g = grad.reshape(-1, out_features).float()
    gx = None
    for r0, r1 in row_chunks(out_features):
        w = dequant_rows(r0, r1)
        gx = g[:, r0:r1] @ w if gx is None else gx.addmm_(g[:, r0:r1], w)
    if gx is None:  # out_features == 0
        gx = g.new_zeros((g.shape[0], in_features))
    return gx.reshape(*grad.shape[:-1], in_features).to(x_dtype)


# --- row dequantizers, one per format (same arguments as the ops) ----------------------------
def lut4_rows(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, rows: int,
              cols: int, absmax_code: Optional[torch.Tensor], absmax_scale: Optional[torch.Tensor],
              absmax_offset: float, absmax_blocksize: int) -> DequantRows:
    """Rows of an nf4/fp4 weight (``lut4_dequantize``'s arguments; packed uint8 [(rows*cols+1)//2])."""
    from quantkit._ops_lib import lut4_decode_absmax

    scales = lut4_decode_absmax(absmax, absmax_code, absmax_scale, absmax_offset, absmax_blocksize)
    flat_packed = packed.reshape(-1)
    # a decoded range must start on a block boundary and on a whole byte (two 4-bit codes)
    align = math.lcm(blocksize, 2)

    def dequant(r0: int, r1: int) -> torch.Tensor:
        e0, e1 = r0 * cols, r1 * cols
        a0 = e0 // align * align
        flat = torch.ops.quantkit.lut4_dequantize(flat_packed[a0 // 2:(e1 + 1) // 2],
                                                  scales[a0 // blocksize:-(-e1 // blocksize)], code, blocksize,
                                                  1, e1 - a0, None, None, 0.0, absmax_blocksize)
        return flat.reshape(-1)[e0 - a0:].view(r1 - r0, cols)

    return dequant


def intk_rows(packed: torch.Tensor, scale: torch.Tensor, bits: int, offset: float, cols: int) -> DequantRows:
    """Rows of an int-k weight (packed uint8 [rows, ceil(cols*bits/8)], scale fp32 [rows])."""
    return lambda r0, r1: torch.ops.quantkit.intk_dequantize(packed[r0:r1], scale[r0:r1], bits, offset,
                                                             r1 - r0, cols)


def dualbin_rows(plane1: torch.Tensor, plane2: torch.Tensor, alpha1: torch.Tensor, alpha2: torch.Tensor,
                 group: int, cols: int) -> DequantRows:
    """Rows of a dual-binary weight (planes uint8 [rows, *], alphas fp16 [rows, G])."""
    return lambda r0, r1: torch.ops.quantkit.dualbin_dequantize(plane1[r0:r1], plane2[r0:r1], alpha1[r0:r1],
                                                                alpha2[r0:r1], group, r1 - r0, cols)


def bitstack_rows(signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: Optional[torch.Tensor]) -> DequantRows:
    """Rows of a BitStack weight (signs uint8 [b, m, ceil(n/8)], u [b, m, k], v [b, k, n])."""
    return lambda r0, r1: torch.ops.quantkit.bitstack_dequantize(signs[:, r0:r1].contiguous(),
                                                                 u[:, r0:r1].contiguous(), v, scale)


def dense_rows(weight: torch.Tensor) -> DequantRows:
    """Rows of a weight stored dense in bf16/fp16 [rows, cols], widened to fp32."""
    return lambda r0, r1: weight[r0:r1].float()


# --- a dense bf16/fp16 weight under autograd ---------------------------------------------------
class _DenseLinearByRows(torch.autograd.Function):
    """y = x @ W.to(x.dtype).T + b with W [out, in] bf16/fp16 widened a row chunk at a time.

    F.linear(x, W.to(x.dtype)) for fp32 x makes an fp32 copy of W and autograd keeps it until
    the backward; here only the stored W is saved and both passes widen chunks of it."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        out_f, in_f = weight.shape
        x2 = x.reshape(-1, in_f)
        y = x2.new_empty((x2.shape[0], out_f))
        for r0, r1 in row_chunks(out_f):
            y[:, r0:r1] = x2 @ weight[r0:r1].to(x.dtype).T
        if bias is not None:
            y += bias
        ctx.save_for_backward(weight)
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        return y.reshape(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        out_f, in_f = weight.shape
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_input_by_rows(grad, out_f, in_f, dense_rows(weight), ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, out_f).sum(0)
        return grad_x, None, grad_bias


def dense_linear_by_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., in] -> [..., out] in x.dtype; bias (if any) already in x.dtype."""
    return _DenseLinearByRows.apply(x, weight, bias)
