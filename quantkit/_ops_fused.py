"""Fused projections of one input (q/k/v, gate/up): schema, fake impl and pure-torch reference.

A decoder block multiplies the same activation by three (q, k, v) or two (gate, up) weights.
Run one by one, each product pays its own op dispatch, activation preparation and thread
fork, which at batch 1 on a small model costs more than its weight bytes; this op runs the
group in one call on the unchanged packed tensors (nothing is concatenated or copied).
Inference only (no autograd): the decode runtime calls it under ``torch.inference_mode``.

lut4_linear_multi(x, packed[], absmax[], code[], blocksize[], out_features[], in_features,
                  bias?[], absmax_code?[], absmax_scale?[], absmax_offset[], absmax_blocksize[])
    -> Tensor
    one entry per weight in every list, as the arguments of ``lut4_linear`` (quantkit/_ops.py);
    x [..., in_features] fp32/bf16/fp16 -> [..., sum(out_features)] in x.dtype, equal to
    ``torch.cat([lut4_linear(x, W_j, ...) for j], -1)``. The native CPU kernel gives each
    column block bit-identical to its single-weight ``lut4_linear`` call.
"""

from __future__ import annotations

import torch

from quantkit._ops_lib import _check_lut4_args, _lib, lut4_linear_reference

_lib.define(
    "lut4_linear_multi(Tensor x, Tensor[] packed, Tensor[] absmax, Tensor[] code, int[] blocksize, "
    "int[] out_features, int in_features, Tensor?[] bias, Tensor?[] absmax_code, Tensor?[] absmax_scale, "
    "float[] absmax_offset, int[] absmax_blocksize) -> Tensor"
)


def _per_weight(packed, absmax, code, blocksize, out_features, bias, absmax_code, absmax_scale, absmax_offset,
                absmax_blocksize):
    n = len(packed)
    lists = (absmax, code, blocksize, out_features, bias, absmax_code, absmax_scale, absmax_offset, absmax_blocksize)
    torch._check(n >= 1, lambda: "lut4_linear_multi needs at least one weight")
    torch._check(all(len(v) == n for v in lists),
                 lambda: f"lut4_linear_multi: every per-weight list must have {n} entries (one per packed weight)")
    return list(zip(packed, *lists))


def lut4_linear_multi_reference(x, packed, absmax, code, blocksize, out_features, in_features, bias, absmax_code,
                                absmax_scale, absmax_offset, absmax_blocksize):
    """cat over the weights of ``lut4_linear_reference`` (fp32 weights, output in x.dtype)."""
    parts = [lut4_linear_reference(x, p, a, c, bs, n, in_features, b, ac, asc, ao, abs_)
             for p, a, c, bs, n, b, ac, asc, ao, abs_ in _per_weight(packed, absmax, code, blocksize, out_features,
                                                                    bias, absmax_code, absmax_scale, absmax_offset,
                                                                    absmax_blocksize)]
    return torch.cat(parts, -1)


_lib.impl("lut4_linear_multi", lut4_linear_multi_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("quantkit::lut4_linear_multi")
def _lut4_linear_multi_fake(x, packed, absmax, code, blocksize, out_features, in_features, bias, absmax_code,
                            absmax_scale, absmax_offset, absmax_blocksize):
    for p, a, c, bs, n, b, ac, asc, ao, abs_ in _per_weight(packed, absmax, code, blocksize, out_features, bias,
                                                           absmax_code, absmax_scale, absmax_offset,
                                                           absmax_blocksize):
        _check_lut4_args(p, a, c, bs, n, in_features, ac, asc, abs_)
    torch._check(x.shape[-1] == in_features,
                 lambda: f"x has last dim {x.shape[-1]} but the weights take {in_features}")
    return x.new_empty((*x.shape[:-1], sum(out_features)))
