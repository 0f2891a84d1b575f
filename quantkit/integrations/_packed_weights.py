"""What a LoRA layer needs from a packed base module, per format, without peft.

    dequant_rows(module)          (r0, r1) -> fp32 [r1 - r0, in]: rows of the dequantized weight
    row_norms(module, A, B, s)    fp32 [out]: ||W + s·B·A||₂ of every row (DoRA), chunk by chunk
    merge_refusal(module)         why merging into this format is refused, or None
    snapshot / restore            a copy of the packed tensors (exact unmerge)
    repack(module, w)             replace the packed tensors by ``w`` [out, in] re-packed in the
                                  module's own format and spec

Only ``repack`` holds a dense copy of a layer (merging is offline, one layer at a time);
everything on the training path works on ``_row_chunks.chunk_rows()`` rows at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from quantkit import _row_chunks
from quantkit.errors import UsageError
from quantkit.formats import lut4
from quantkit.nn import BitStackLinear, DenseLinear, DualBinLinear, IntKLinear, Lut4Linear
from quantkit.nn.packed_embedding import DenseEmbedding, IntKEmbedding, Lut4Embedding

PACKED_LINEARS = (Lut4Linear, IntKLinear, DualBinLinear, BitStackLinear, DenseLinear)
# packed tables subclass their format's linear (same buffers) but their forward is a lookup
PACKED_EMBEDDINGS = (Lut4Embedding, IntKEmbedding, DenseEmbedding)

_INTK_MAX_CODE = {"ternary": 2}  # grids that use fewer than 2^bits codes


def dequant_rows(module: nn.Module) -> _row_chunks.DequantRows:
    """Row-chunk dequantizer of a packed linear (the same one its op's backward uses)."""
    if isinstance(module, Lut4Linear):
        packed, absmax, code, a_code, a_scale, a_off, a_bs = module._op_weight_args()
        return _row_chunks.lut4_rows(packed, absmax, code, module.state.blocksize, module.out_features,
                                     module.in_features, a_code, a_scale, a_off, a_bs)
    if isinstance(module, IntKLinear):
        s = module.state
        return _row_chunks.intk_rows(module.weight, module.weight_scale, s.bits, s.offset, module.in_features)
    if isinstance(module, DualBinLinear):
        return _row_chunks.dualbin_rows(module.weight_plane1, module.weight_plane2, module.weight_alpha1,
                                        module.weight_alpha2, module.state.group, module.in_features)
    if isinstance(module, BitStackLinear):
        p = module.packed()
        return _row_chunks.bitstack_rows(p.signs, p.u, p.v, p.scale)
    if isinstance(module, DenseLinear):
        return _row_chunks.dense_rows(module.weight)
    raise UsageError(f"{type(module).__name__} is not a quantkit packed linear")


@torch.no_grad()
def row_norms(module: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 [out]: L2 norm of every row of W + scaling · lora_b @ lora_a, W the base's dequantized
    weight [out, in], lora_a [r, in], lora_b [out, r]; built ``chunk_rows()`` rows at a time."""
    rows = dequant_rows(module)
    a = lora_a.float()
    norms = torch.empty(module.out_features, dtype=torch.float32, device=a.device)
    for r0, r1 in _row_chunks.row_chunks(module.out_features):
        w = rows(r0, r1).to(a.device).addmm_(lora_b[r0:r1].float(), a, alpha=scaling)
        norms[r0:r1] = torch.linalg.vector_norm(w, dim=1)
    return norms


def merge_refusal(module: nn.Module) -> Optional[str]:
    """Why a LoRA delta cannot be merged into ``module``'s format (None: it can)."""
    name = type(module).__name__
    if isinstance(module, DualBinLinear):
        return (f"merging a LoRA adapter into a {name} (dual-binary, 2 bits/weight) is refused: its two binary planes "
                "and per-group scales were distilled from the full-precision model (DB-LLM), and re-encoding "
                "W + delta on them rounds almost all of a LoRA delta away (it is far below the level spacing). "
                "Keep the adapter unmerged (model.unload() gives the base back; save the adapter with "
                "save_pretrained), or re-run the dbllm pass on the merged full-precision model.")
    if isinstance(module, BitStackLinear):
        return (f"merging a LoRA adapter into a {name} is refused: a BitStack weight is a residual stack of "
                "sign x low-rank blocks fitted with calibration activations and ranked model-wide for memory "
                "budgets; putting W + delta back means re-running that whole decomposition (a new compression, "
                "not a merge), and every budget's block order would change. Keep the adapter unmerged "
                "(model.unload() gives the base back), or re-run the bitstack pass on the merged "
                "full-precision model.")
    return None


def snapshot(module: nn.Module) -> dict:
    """Copies of the module's packed tensors, bias and format state (restored by ``restore``)."""
    snap = {"buffers": {n: b.clone() for n, b in module.named_buffers(recurse=False) if b is not None},
            "bias": None if module.bias is None else module.bias.detach().clone()}
    if hasattr(module, "state"):
        snap["state"] = module.state
    return snap


def restore(module: nn.Module, snap: dict) -> None:
    for name, t in snap["buffers"].items():
        setattr(module, name, t)
    if snap["bias"] is not None:
        module.bias.data.copy_(snap["bias"])
    if "state" in snap:
        module.state = snap["state"]


@torch.no_grad()
def repack(module: nn.Module, w: torch.Tensor) -> None:
    """Replace ``module``'s packed tensors by ``w`` (fp32 [out, in]) packed in the same format
    and spec (quant type, block size, double quant / bits, offset, grid / storage dtype)."""
    refusal = merge_refusal(module)
    if refusal is not None:
        raise UsageError(refusal)
    device = module.bias.device if module.bias is not None else next(module.buffers()).device
    w = w.float().cpu()
    if isinstance(module, Lut4Linear):
        _repack_lut4(module, w, device)
    elif isinstance(module, IntKLinear):
        # round onto the module's own grid: same bits, offset and per-row step (the step QAT
        # learned or round-to-nearest chose); values beyond the grid clamp to its ends
        s = module.state
        scale = module.weight_scale.float().cpu()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
        codes = torch.clamp(torch.round(w / safe + s.offset), 0, _INTK_MAX_CODE.get(s.grid, 2 ** s.bits - 1))
        from quantkit.formats import intk

        module.weight = intk.pack_codes(codes.to(torch.int64), s.bits).to(device)
    elif isinstance(module, DenseLinear):
        module.weight = w.to(getattr(torch, module.storage_dtype)).contiguous().to(device)
    else:
        raise UsageError(f"{type(module).__name__} is not a quantkit packed linear")


def _lut4_codes_on_own_scales(module: Lut4Linear, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [(n+1)//2, 1], its dequantization fp32 [out, in]): w rounded to the nearest
    code with the layer's block scales kept (clamped to +-absmax)."""
    s = module.state
    q = module.packed()
    scales = lut4.decode_absmax(lut4.Lut4Weight(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in (
        q.packed, q.absmax, q.quant_map, q.state, q.nested_absmax, q.nested_quant_map))))
    flat = w.reshape(-1)
    n = flat.numel()
    per_elem = scales[torch.arange(n) // s.blocksize]
    scaled = torch.clamp(flat * (1.0 / per_elem.clamp(min=1e-38)), -1, 1)
    codes = lut4._encode(torch.nn.functional.pad(scaled, (0, n % 2)), s.quant_type)  # odd n: pad as quantize does
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1).contiguous()
    return packed, (q.quant_map.cpu()[codes[:n].long()] * per_elem).view_as(w)


def _repack_lut4(module: Lut4Linear, w: torch.Tensor, device) -> None:
    """The better of two nf4/fp4 encodings of w, same quant type, block size and double quant:
    (a) new codes on the layer's own block scales: every weight moves to a grid point at least
    as close as its old one, so it never ends farther from w than the base was; best for a
    LoRA delta, which is mostly smaller than the rounding step; (b) a full re-quantization
    (new block scales): better when the delta moves a block's largest weight a lot."""
    s = module.state
    packed_a, deq_a = _lut4_codes_on_own_scales(module, w)
    q = lut4.quantize(w, s.quant_type, s.blocksize, s.nested)
    if (deq_a - w).norm() <= (lut4.dequantize(q) - w).norm():
        module.weight = packed_a.to(device)
        return
    module.weight = q.packed.to(device)
    module.weight_absmax = q.absmax.to(device)
    module.weight_quant_map = q.quant_map.to(device)
    if s.nested:
        module.weight_nested_absmax = q.nested_absmax.to(device)
        module.weight_nested_quant_map = q.nested_quant_map.to(device)
    module.state = dataclasses.replace(q.state, dtype=s.dtype)  # new nested_offset, original dtype name
