"""What the op modules share: the ``quantkit`` op library and the argument checks and
decoders more than one op family uses, and the lut4 references (``quantkit/_ops.py``: linear ops;
``quantkit/_ops_embedding.py``: row lookups; ``quantkit/_row_chunks.py``: backward by rows).
Imports nothing of quantkit, so those modules depend on it and never on each other's
import order."""

from __future__ import annotations

from typing import Optional

import torch

_lib = torch.library.Library("quantkit", "DEF")


def _check_lut4_args(packed, absmax, code, blocksize, rows, cols, absmax_code, absmax_scale,
                     absmax_blocksize) -> None:
    """Shape/dtype checks shared by the fake and reference impls (messages name the shapes)."""
    n = rows * cols
    nb = -(-n // blocksize) if blocksize > 0 else 0
    torch._check(blocksize > 0, lambda: f"blocksize must be positive, got {blocksize}")
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check(packed.numel() == (n + 1) // 2,
                 lambda: f"packed has {packed.numel()} bytes but a {rows}x{cols} weight needs {(n + 1) // 2}")
    torch._check(code.numel() == 16 and code.dtype == torch.float32,
                 lambda: f"code must be fp32 [16], got {code.dtype} {list(code.shape)}")
    torch._check(absmax.numel() == nb,
                 lambda: f"absmax has {absmax.numel()} entries but {rows}x{cols} at blocksize {blocksize} needs {nb}")
    if absmax.dtype == torch.uint8:
        torch._check(absmax_code is not None and absmax_scale is not None,
                     lambda: "uint8 (double-quantized) absmax needs absmax_code and absmax_scale")
        torch._check(absmax_blocksize > 0, lambda: f"absmax_blocksize must be positive, got {absmax_blocksize}")
        torch._check(absmax_code.numel() == 256, lambda: f"absmax_code must have 256 entries, got {absmax_code.numel()}")
        torch._check(absmax_scale.numel() == -(-nb // absmax_blocksize),
                     lambda: f"absmax_scale has {absmax_scale.numel()} entries, expected {-(-nb // absmax_blocksize)}")
    else:
        torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be fp32 or uint8, got {absmax.dtype}")


def lut4_decode_absmax(absmax: torch.Tensor, absmax_code: Optional[torch.Tensor],
                       absmax_scale: Optional[torch.Tensor], absmax_offset: float,
                       absmax_blocksize: int) -> torch.Tensor:
    """fp32 [nb] block scales, undoing double quantization when ``absmax`` is uint8."""
    if absmax.dtype != torch.uint8:
        return absmax.float()
    idx = torch.arange(absmax.numel(), device=absmax.device) // absmax_blocksize
    return absmax_code[absmax.long()] * absmax_scale[idx] + absmax_offset


def _check_intk_args(packed, scale, bits, offset, rows, cols) -> None:
    torch._check(1 <= bits <= 8, lambda: f"bits must be 1..8, got {bits}")
    nbytes = -(-cols * bits // 8)
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check(packed.dim() == 2 and packed.shape[0] == rows and packed.shape[1] == nbytes,
                 lambda: f"packed must be [{rows}, {nbytes}] for a {rows}x{cols} {bits}-bit weight, "
                         f"got {list(packed.shape)}")
    torch._check(scale.dtype == torch.float32 and scale.numel() == rows,
                 lambda: f"scale must be fp32 [{rows}], got {scale.dtype} {list(scale.shape)}")


def lut4_dequantize_reference(packed, absmax, code, blocksize, rows, cols, absmax_code=None,
                              absmax_scale=None, absmax_offset=0.0, absmax_blocksize=256):
    """Pure-torch reference: code[index] * absmax[block], fp32 [rows, cols]."""
    _check_lut4_args(packed, absmax, code, blocksize, rows, cols, absmax_code, absmax_scale, absmax_blocksize)
    n = rows * cols
    flat = packed.reshape(-1)
    idx = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()
    scales = lut4_decode_absmax(absmax, absmax_code, absmax_scale, absmax_offset, absmax_blocksize)
    block = torch.arange(n, device=packed.device) // blocksize
    return (code[idx] * scales[block]).reshape(rows, cols)


def lut4_linear_reference(x, packed, absmax, code, blocksize, out_features, in_features, bias=None,
                          absmax_code=None, absmax_scale=None, absmax_offset=0.0, absmax_blocksize=256):
    """Pure-torch reference: (x.float() @ W.T + bias) in fp32, cast to x.dtype.

    W stays fp32 here for every x dtype; the native CPU kernel's large-batch path for bf16/fp16
    x rounds W to x.dtype first (see the module docstring), so compare it with a bf16/fp16
    tolerance, or against this function given W rounded to x.dtype.
    """
    torch._check(x.shape[-1] == in_features,
                 lambda: f"x has last dim {x.shape[-1]} but the weight is {out_features}x{in_features}")
    w = lut4_dequantize_reference(packed, absmax, code, blocksize, out_features, in_features,
                                  absmax_code, absmax_scale, absmax_offset, absmax_blocksize)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
