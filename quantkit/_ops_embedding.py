"""Embedding lookups on packed tables: schema, fake impl and pure-torch reference.

A token-embedding table [rows = vocabulary, cols = hidden] stored in a packed linear format
is read a few rows at a time (one per token), so these ops decode only the rows they gather;
the whole table is never dequantized. Defined in ``quantkit::`` next to the formats' other
ops (quantkit/_ops.py imports this module before the native kernels register; the CPU
kernels live beside each format's ops in csrc/ops/{intk,lut4}_ops.cpp).

intk_embedding(ids, packed, scale, bits, offset, rows, cols) -> Tensor
    ids int64 (any shape, values in [0, rows)); packed uint8 [rows, ceil(cols*bits/8)];
    scale fp32 [rows]. Returns fp32 [*ids.shape, cols] with out[..., c] =
    (code[id, c] - offset) * scale[id], bit-identical to rows of intk_dequantize.
lut4_embedding(ids, packed, absmax, code, blocksize, rows, cols, absmax_code?, absmax_scale?,
               absmax_offset, absmax_blocksize) -> Tensor
    the lut4 (nf4/fp4, bitsandbytes) layout of lut4_dequantize: blocks run over the
    row-major flattened table, so a row may start inside a block when cols % blocksize != 0.
    Returns fp32 [*ids.shape, cols], bit-identical to rows of lut4_dequantize.
An id outside [0, rows) raises IndexError naming it (the reference and the CPU kernels).
"""

from __future__ import annotations

import torch

from quantkit._ops_lib import _check_intk_args, _check_lut4_args, _lib
from quantkit.formats import intk

_lib.define("intk_embedding(Tensor ids, Tensor packed, Tensor scale, int bits, float offset, int rows, "
            "int cols) -> Tensor")
_lib.define(
    "lut4_embedding(Tensor ids, Tensor packed, Tensor absmax, Tensor code, int blocksize, int rows, int cols, "
    "Tensor? absmax_code, Tensor? absmax_scale, float absmax_offset, int absmax_blocksize) -> Tensor"
)


def _check_ids(ids: torch.Tensor, rows: int) -> torch.Tensor:
    """ids flattened to int64 [m]; raises IndexError for an id outside the table."""
    torch._check(not ids.is_floating_point() and not ids.is_complex(),
                 lambda: f"ids must be an integer tensor, got {ids.dtype}")
    flat = ids.reshape(-1).long()
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= rows:
            bad = lo if lo < 0 else hi
            raise IndexError(f"token id {bad} is outside the embedding table of {rows} rows")
    return flat


def intk_embedding_reference(ids, packed, scale, bits, offset, rows, cols):
    """Pure torch: unpack the gathered rows only, (code - offset) * scale[row] in fp32."""
    _check_intk_args(packed, scale, bits, offset, rows, cols)
    flat = _check_ids(ids, rows)
    codes = intk.unpack_codes(packed[flat], bits, cols)
    out = (codes.to(torch.float32) - offset) * scale[flat][:, None]
    return out.reshape(*ids.shape, cols)


def lut4_embedding_reference(ids, packed, absmax, code, blocksize, rows, cols, absmax_code=None,
                             absmax_scale=None, absmax_offset=0.0, absmax_blocksize=256):
    """Pure torch: for each gathered element e = id·cols + c, code[nibble e] · absmax[e // blocksize]."""
    _check_lut4_args(packed, absmax, code, blocksize, rows, cols, absmax_code, absmax_scale, absmax_blocksize)
    flat = _check_ids(ids, rows)
    e = flat[:, None] * cols + torch.arange(cols, device=packed.device)  # [m, cols] flat element index
    byte = packed.reshape(-1)[e >> 1]
    nibble = torch.where((e & 1) == 0, byte >> 4, byte & 0xF).long()  # high nibble = even element
    blocks = e // blocksize
    if absmax.dtype == torch.uint8:  # the decode of lut4_decode_absmax, on the needed blocks only
        scales = absmax_code[absmax[blocks].long()] * absmax_scale[blocks // absmax_blocksize] + absmax_offset
    else:
        scales = absmax.float()[blocks]
    return (code[nibble] * scales).reshape(*ids.shape, cols)


_lib.impl("intk_embedding", intk_embedding_reference, "CompositeExplicitAutograd")
_lib.impl("lut4_embedding", lut4_embedding_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("quantkit::intk_embedding")
def _intk_embedding_fake(ids, packed, scale, bits, offset, rows, cols):
    _check_intk_args(packed, scale, bits, offset, rows, cols)
    return packed.new_empty((*ids.shape, cols), dtype=torch.float32)


@torch.library.register_fake("quantkit::lut4_embedding")
def _lut4_embedding_fake(ids, packed, absmax, code, blocksize, rows, cols, absmax_code, absmax_scale,
                         absmax_offset, absmax_blocksize):
    _check_lut4_args(packed, absmax, code, blocksize, rows, cols, absmax_code, absmax_scale, absmax_blocksize)
    return packed.new_empty((*ids.shape, cols), dtype=torch.float32)
