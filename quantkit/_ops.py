"""Every ``torch.ops.quantkit`` op: schema, fake (meta) impl, pure-torch reference.

The reference is registered for ``CompositeExplicitAutograd`` so every device works;
native kernels (``quantkit._C``, built from ``csrc/``) register for the CPU (and CUDA)
dispatch keys of the same ops and win on those devices. Modules call only
``torch.ops.quantkit.*``.

``QUANTKIT_KERNEL`` picks the implementation, read once at import:
  auto   (default) use native kernels when ``quantkit._C`` imports, else the reference
  torch  never load ``quantkit._C``: every op runs the pure-torch reference
  native require ``quantkit._C``; importing quantkit fails with a rebuild hint otherwise

Ops
---
lut4_dequantize(packed, absmax, code, blocksize, rows, cols,
                absmax_code?, absmax_scale?, absmax_offset, absmax_blocksize) -> Tensor
    packed  uint8 [(rows*cols+1)//2]  4-bit indices, high nibble = even element
    absmax  fp32 [nb] (nb = ceil(rows*cols/blocksize)), or uint8 [nb] when double-quantized:
            then absmax[b] = absmax_code[q[b]] * absmax_scale[b // absmax_blocksize] + offset
    code    fp32 [16] lookup table (nf4 or fp4)
    returns fp32 [rows, cols]; blocks run over the row-major flattened weight.
lut4_linear(x, packed, absmax, code, blocksize, out_features, in_features, bias?,
            absmax_code?, absmax_scale?, absmax_offset, absmax_blocksize) -> Tensor
    x [..., in_features] fp32/bf16/fp16 -> [..., out_features] in x.dtype;
    y = x @ W.T + bias with W = lut4_dequantize(...) [out_features, in_features],
    accumulated in fp32.
    Native CPU kernel, large batches (m = rows of x above a per-dtype threshold, see
    gemm_threshold in csrc/ops/lut4_ops.cpp): for fp32 x, W is dequantized to fp32 and MKL sgemm runs
    (same values as the reference up to summation order). For bf16/fp16 x, W is dequantized
    and then ROUNDED TO x.dtype (round to nearest even, exactly as W.to(x.dtype)) before the
    product, as bitsandbytes does (dequantize to the compute dtype, then F.linear); the GEMM
    runs in x.dtype on oneDNN (AMX for bf16) with fp32 accumulation and one rounding of the
    output. A bias of x.dtype is fused into that GEMM; a bias of another dtype is added in
    fp32 to the already rounded product (a second rounding). So there
    y = (x.float() @ W.to(x.dtype).float().T + bias.float()).to(x.dtype) up to summation
    order and <= 1 ulp of x.dtype; against this fp32-W reference it differs by the weight's
    rounding (relative 2^-9 per weight for bf16, 2^-12 for fp16; fp16 weights beyond
    +-65504 become inf, as W.to(torch.float16) does). Small batches (the fused decode kernel)
    keep fp32 weights for every dtype.
bitstack_dequantize(signs, u, v, scale?) / bitstack_linear(x, signs, u, v, bias?, scale?)
    BitStack residual blocks; documented in the BitStack section below.
bitstack_feedback_signs(r, mag, hinv_u, cols) / bitstack_refine_signs(r, mag, signs, h, sweeps, cols)
    BitStack's compress-time sign choice (error feedback, coordinate descent); same section.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from quantkit import _row_chunks
from quantkit._ops_lib import (_check_intk_args, _check_lut4_args, _lib, lut4_decode_absmax,  # noqa: F401 (re-exported)
                               lut4_dequantize_reference, lut4_linear_reference)
from quantkit.errors import KernelUnavailable

_lib.define(
    "lut4_dequantize(Tensor packed, Tensor absmax, Tensor code, int blocksize, int rows, int cols, "
    "Tensor? absmax_code, Tensor? absmax_scale, float absmax_offset, int absmax_blocksize) -> Tensor"
)
_lib.define(
    "lut4_linear(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, "
    "int out_features, int in_features, Tensor? bias, Tensor? absmax_code, Tensor? absmax_scale, "
    "float absmax_offset, int absmax_blocksize) -> Tensor"
)


_lib.impl("lut4_dequantize", lut4_dequantize_reference, "CompositeExplicitAutograd")
_lib.impl("lut4_linear", lut4_linear_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("quantkit::lut4_dequantize")
def _lut4_dequantize_fake(packed, absmax, code, blocksize, rows, cols, absmax_code, absmax_scale,
                          absmax_offset, absmax_blocksize):
    _check_lut4_args(packed, absmax, code, blocksize, rows, cols, absmax_code, absmax_scale, absmax_blocksize)
    return packed.new_empty((rows, cols), dtype=torch.float32)


@torch.library.register_fake("quantkit::lut4_linear")
def _lut4_linear_fake(x, packed, absmax, code, blocksize, out_features, in_features, bias,
                      absmax_code, absmax_scale, absmax_offset, absmax_blocksize):
    torch._check(x.shape[-1] == in_features,
                 lambda: f"x has last dim {x.shape[-1]} but the weight is {out_features}x{in_features}")
    _check_lut4_args(packed, absmax, code, blocksize, out_features, in_features, absmax_code,
                     absmax_scale, absmax_blocksize)
    return x.new_empty((*x.shape[:-1], out_features))


# Autograd: gradients flow to x and bias (the packed weight is frozen), so LoRA-style
# training on top of a 4-bit base works. dx = dy @ W, dbias = sum(dy). Every packed op's
# backward computes dx a few hundred rows of W at a time (quantkit/_row_chunks.py), so a
# backward never holds a dense fp32 copy of the whole weight.
def _lut4_linear_setup_context(ctx, inputs, output):
    (x, packed, absmax, code, blocksize, out_f, in_f, bias, a_code, a_scale, a_off, a_bs) = inputs
    ctx.save_for_backward(packed, absmax, code, a_code, a_scale)
    ctx.meta = (blocksize, out_f, in_f, a_off, a_bs, bias is not None, x.dtype)


def _lut4_linear_backward(ctx, grad):
    packed, absmax, code, a_code, a_scale = ctx.saved_tensors
    blocksize, out_f, in_f, a_off, a_bs, has_bias, x_dtype = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        rows = _row_chunks.lut4_rows(packed, absmax, code, blocksize, out_f, in_f, a_code, a_scale, a_off, a_bs)
        grad_x = _row_chunks.grad_input_by_rows(grad, out_f, in_f, rows, x_dtype)
    if has_bias and ctx.needs_input_grad[7]:
        grad_bias = grad.reshape(-1, out_f).sum(0)
    return grad_x, None, None, None, None, None, None, grad_bias, None, None, None, None


torch.library.register_autograd("quantkit::lut4_linear", _lut4_linear_backward,
                                setup_context=_lut4_linear_setup_context)


# ----------------------------------------------------------------------------------------
# int-k (quantkit/formats/intk.py): k-bit codes, per-output-channel fp32 scale
# ----------------------------------------------------------------------------------------
# intk_dequantize(packed, scale, bits, offset, rows, cols) -> Tensor
#     packed  uint8 [rows, ceil(cols*bits/8)]  each row a little-endian bitstream of k-bit codes
#     scale   fp32 [rows]
#     returns fp32 [rows, cols] = (code - offset) * scale[row], exactly this fp32 expression.
# intk_linear(x, packed, scale, bits, offset, out_features, in_features, bias?) -> Tensor
#     x [..., in_features] fp32/bf16/fp16 -> [..., out_features] in x.dtype;
#     y = (x.float() @ W.T + bias.float()).to(x.dtype), W = intk_dequantize(...) fp32.
_lib.define("intk_dequantize(Tensor packed, Tensor scale, int bits, float offset, int rows, int cols) -> Tensor")
_lib.define(
    "intk_linear(Tensor x, Tensor packed, Tensor scale, int bits, float offset, int out_features, "
    "int in_features, Tensor? bias) -> Tensor"
)


def intk_dequantize_reference(packed, scale, bits, offset, rows, cols):
    """Pure-torch reference: (code - offset) * scale[row], fp32 [rows, cols]."""
    _check_intk_args(packed, scale, bits, offset, rows, cols)
    nbytes = packed.shape[1]
    bitpos = torch.arange(8, device=packed.device)
    stream = ((packed.to(torch.int32)[:, :, None] >> bitpos) & 1).reshape(rows, nbytes * 8)[:, :cols * bits]
    place = 1 << torch.arange(bits, device=packed.device, dtype=torch.int32)
    codes = (stream.reshape(rows, cols, bits) * place).sum(-1)
    return (codes.to(torch.float32) - offset) * scale.reshape(rows, 1)


def intk_linear_reference(x, packed, scale, bits, offset, out_features, in_features, bias=None):
    """Pure-torch reference: (x.float() @ W.T + bias) in fp32, cast to x.dtype."""
    torch._check(x.shape[-1] == in_features,
                 lambda: f"x has last dim {x.shape[-1]} but the weight is {out_features}x{in_features}")
    w = intk_dequantize_reference(packed, scale, bits, offset, out_features, in_features)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


_lib.impl("intk_dequantize", intk_dequantize_reference, "CompositeExplicitAutograd")
_lib.impl("intk_linear", intk_linear_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("quantkit::intk_dequantize")
def _intk_dequantize_fake(packed, scale, bits, offset, rows, cols):
    _check_intk_args(packed, scale, bits, offset, rows, cols)
    return packed.new_empty((rows, cols), dtype=torch.float32)


@torch.library.register_fake("quantkit::intk_linear")
def _intk_linear_fake(x, packed, scale, bits, offset, out_features, in_features, bias):
    torch._check(x.shape[-1] == in_features,
                 lambda: f"x has last dim {x.shape[-1]} but the weight is {out_features}x{in_features}")
    _check_intk_args(packed, scale, bits, offset, out_features, in_features)
    return x.new_empty((*x.shape[:-1], out_features))


def _intk_linear_setup_context(ctx, inputs, output):
    x, packed, scale, bits, offset, out_f, in_f, bias = inputs
    ctx.save_for_backward(packed, scale)
    ctx.meta = (bits, offset, out_f, in_f, bias is not None, x.dtype)


def _intk_linear_backward(ctx, grad):
    # gradients flow to x and bias; the packed weight is frozen (as for lut4_linear)
    packed, scale = ctx.saved_tensors
    bits, offset, out_f, in_f, has_bias, x_dtype = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        rows = _row_chunks.intk_rows(packed, scale, bits, offset, in_f)
        grad_x = _row_chunks.grad_input_by_rows(grad, out_f, in_f, rows, x_dtype)
    if has_bias and ctx.needs_input_grad[7]:
        grad_bias = grad.reshape(-1, out_f).sum(0)
    return grad_x, None, None, None, None, None, None, grad_bias


torch.library.register_autograd("quantkit::intk_linear", _intk_linear_backward,
                                setup_context=_intk_linear_setup_context)


# ----------------------------------------------------------------------------------------
# BitStack (quantkit/formats/bitstack.py): b residual blocks, each S_i ⊙ (u_i v_i)
# ----------------------------------------------------------------------------------------
# bitstack_dequantize(signs, u, v, scale?) -> Tensor
#     signs uint8 [b, m, ceil(n/8)] (bit 1 = +1, MSB first per row); factors either u fp16
#     [b, m, k], v fp16 [b, k, n] and no scale, or u int8 [b, m, k], v int8 [b, k, n] and
#     scale fp32 [b, k] (u_i v_i = Σ_j scale[i, j] u_i[:, j] ⊗ v_i[j, :]); returns fp32 [m, n]
#     = Σ_i S_i ⊙ (u_i v_i).
# bitstack_linear(x, signs, u, v, bias?, scale?) -> Tensor
#     x [..., n] fp32/bf16/fp16 -> [..., m] in x.dtype; y = x @ Ŵᵀ + bias with Ŵ the
#     dequantized weight above, accumulated in fp32. The native CPU kernel never builds Ŵ for
#     a few rows of x (decode): it uses y_r = Σ_i Σ_j u_i[r,j] Σ_c S_i[r,c] v_i[j,c] x_c
#     (csrc/cpu/bitstack_linear.cpp); above a row threshold it rebuilds Ŵ and runs a GEMM.
_lib.define("bitstack_dequantize(Tensor signs, Tensor u, Tensor v, Tensor? scale=None) -> Tensor")
_lib.define("bitstack_linear(Tensor x, Tensor signs, Tensor u, Tensor v, Tensor? bias, Tensor? scale=None) -> Tensor")


def _check_bitstack_args(signs, u, v, scale=None) -> None:
    torch._check(signs.dim() == 3 and u.dim() == 3 and v.dim() == 3,
                 lambda: f"bitstack: signs, u, v must be 3-D [b, m, ceil(n/8)], [b, m, k], [b, k, n]; got "
                         f"{list(signs.shape)}, {list(u.shape)}, {list(v.shape)}")
    fp16 = u.dtype == torch.float16 and v.dtype == torch.float16 and scale is None
    int8 = u.dtype == torch.int8 and v.dtype == torch.int8 and scale is not None
    torch._check(signs.dtype == torch.uint8 and (fp16 or int8),
                 lambda: f"bitstack: signs must be uint8 and u, v float16 (no scale) or int8 (with an fp32 scale); got "
                         f"{signs.dtype}, {u.dtype}, {v.dtype}, scale {None if scale is None else scale.dtype}")
    b, m, k = u.shape
    n = v.shape[2]
    torch._check(b >= 1 and signs.shape[0] == b and v.shape[0] == b,
                 lambda: f"bitstack: block counts differ: signs {signs.shape[0]}, u {b}, v {v.shape[0]}")
    torch._check(v.shape[1] == k, lambda: f"bitstack: u has rank k={k} but v is {list(v.shape)}")
    torch._check(signs.shape[1] == m and signs.shape[2] == (n + 7) // 8,
                 lambda: f"bitstack: signs is {list(signs.shape)} but an m={m} x n={n} weight needs "
                         f"[{b}, {m}, {(n + 7) // 8}]")
    if scale is not None:
        torch._check(scale.dtype == torch.float32 and tuple(scale.shape) == (b, k),
                     lambda: f"bitstack: scale must be fp32 [{b}, {k}], got {scale.dtype} {list(scale.shape)}")


def bitstack_dequantize_reference(signs, u, v, scale=None):
    """Pure-torch reference: Σ_i S_i ⊙ (u_i v_i), fp32 [m, n]."""
    from quantkit.formats.bitstack import BitStackBlocks, reconstruct

    _check_bitstack_args(signs, u, v, scale)
    return reconstruct(BitStackBlocks(signs, u, v, scale))


def bitstack_linear_reference(x, signs, u, v, bias=None, scale=None):
    """Pure-torch reference: (x.float() @ Ŵᵀ + bias) in fp32, cast to x.dtype (Ŵ rebuilt)."""
    _check_bitstack_args(signs, u, v, scale)
    torch._check(x.shape[-1] == v.shape[2],
                 lambda: f"bitstack_linear: x has last dim {x.shape[-1]} but the weight is "
                         f"{u.shape[1]}x{v.shape[2]}")
    y = x.float() @ bitstack_dequantize_reference(signs, u, v, scale).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


_lib.impl("bitstack_dequantize", bitstack_dequantize_reference, "CompositeExplicitAutograd")
_lib.impl("bitstack_linear", bitstack_linear_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("quantkit::bitstack_dequantize")
def _bitstack_dequantize_fake(signs, u, v, scale=None):
    _check_bitstack_args(signs, u, v, scale)
    return u.new_empty((u.shape[1], v.shape[2]), dtype=torch.float32)


@torch.library.register_fake("quantkit::bitstack_linear")
def _bitstack_linear_fake(x, signs, u, v, bias, scale=None):
    _check_bitstack_args(signs, u, v, scale)
    torch._check(x.shape[-1] == v.shape[2],
                 lambda: f"bitstack_linear: x has last dim {x.shape[-1]} but the weight is "
                         f"{u.shape[1]}x{v.shape[2]}")
    return x.new_empty((*x.shape[:-1], u.shape[1]))


# BitStack compress-time sign choice (quantkit/formats/bitstack.py), fp32 throughout:
# bitstack_feedback_signs(r, mag, hinv_u, cols) -> Tensor
#     r, mag [m, n], hinv_u [n, n] (upper Cholesky factor of the damped inverse Gram):
#     signs ±1 [m, n] of the block S ⊙ mag chosen column by column with GPTQ error feedback.
# bitstack_refine_signs(r, mag, signs, h, sweeps, cols) -> Tensor
#     h [n, n] the damped Gram: ``sweeps`` coordinate-descent sweeps over ``signs``.
#     Both take columns in groups of ``cols``. The native CPU kernel (csrc/ops/bitstack_sign_ops.cpp)
#     runs the sequential per-column loop in C++; the same arithmetic as the reference up to
#     the rounding of torch's vectorised kernels, so a near-tie can resolve differently.
_lib.define("bitstack_feedback_signs(Tensor r, Tensor mag, Tensor hinv_u, int cols=32) -> Tensor")
_lib.define("bitstack_refine_signs(Tensor r, Tensor mag, Tensor signs, Tensor h, int sweeps, int cols=32) -> Tensor")


def _check_sign_args(op, r, mag, square, name, cols, signs=None) -> None:
    torch._check(r.dim() == 2, lambda: f"{op}: r must be 2-D [m, n], got {list(r.shape)}")
    m, n = r.shape
    for what, t, shape in (("r", r, (m, n)), ("mag", mag, (m, n)), (name, square, (n, n)),
                           ("signs", signs, (m, n))):
        if t is not None:
            torch._check(t.dtype == torch.float32 and tuple(t.shape) == shape,
                         lambda: f"{op}: {what} must be float32 {list(shape)}, got {t.dtype} {list(t.shape)}")
    torch._check(cols >= 1, lambda: f"{op}: cols must be >= 1, got {cols}")


def bitstack_feedback_signs_reference(r, mag, hinv_u, cols=32):
    """Pure-torch reference (quantkit.formats.bitstack._feedback_signs)."""
    from quantkit.formats.bitstack import _feedback_signs

    _check_sign_args("bitstack_feedback_signs", r, mag, hinv_u, "hinv_u", cols)
    return _feedback_signs(r, mag, hinv_u, cols)


def bitstack_refine_signs_reference(r, mag, signs, h, sweeps, cols=32):
    """Pure-torch reference (quantkit.formats.bitstack._refine_signs)."""
    from quantkit.formats.bitstack import _refine_signs

    _check_sign_args("bitstack_refine_signs", r, mag, h, "h", cols, signs)
    torch._check(sweeps >= 0, lambda: f"bitstack_refine_signs: sweeps must be >= 0, got {sweeps}")
    return _refine_signs(r, mag, signs, h, sweeps, cols)


_lib.impl("bitstack_feedback_signs", bitstack_feedback_signs_reference, "CompositeExplicitAutograd")
_lib.impl("bitstack_refine_signs", bitstack_refine_signs_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("quantkit::bitstack_feedback_signs")
def _bitstack_feedback_signs_fake(r, mag, hinv_u, cols=32):
    _check_sign_args("bitstack_feedback_signs", r, mag, hinv_u, "hinv_u", cols)
    return r.new_empty(r.shape)


@torch.library.register_fake("quantkit::bitstack_refine_signs")
def _bitstack_refine_signs_fake(r, mag, signs, h, sweeps, cols=32):
    _check_sign_args("bitstack_refine_signs", r, mag, h, "h", cols, signs)
    return r.new_empty(r.shape)


# Autograd for x and bias (the blocks are frozen): dx = dy @ Ŵ, dbias = Σ dy.
def _bitstack_linear_setup_context(ctx, inputs, output):
    x, signs, u, v, bias, scale = inputs
    ctx.save_for_backward(signs, u, v, scale)
    ctx.meta = (bias is not None, x.dtype)


def _bitstack_linear_backward(ctx, grad):
    signs, u, v, scale = ctx.saved_tensors
    has_bias, x_dtype = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        out_f, in_f = u.shape[1], v.shape[2]
        rows = _row_chunks.bitstack_rows(signs, u, v, scale)
        grad_x = _row_chunks.grad_input_by_rows(grad, out_f, in_f, rows, x_dtype)
    if has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, u.shape[1]).sum(0)
    return grad_x, None, None, None, grad_bias, None


torch.library.register_autograd("quantkit::bitstack_linear", _bitstack_linear_backward,
                                setup_context=_bitstack_linear_setup_context)


# ----------------------------------------------------------------------------------------
# dualbin (DB-LLM Flexible Dual Binarization, quantkit/formats/dualbin.py)
# ----------------------------------------------------------------------------------------
# dualbin_dequantize(plane1, plane2, alpha1, alpha2, group, rows, cols) -> Tensor
#     plane1, plane2  uint8 [rows, G*group/8], G = ceil(cols/group); element k of a row is
#                     bit k%8 of byte k//8 (LSB first); bits past cols are 0
#     alpha1, alpha2  fp16 [rows, G]
#     returns fp32 [rows, cols]: alpha1[n, k//group]*b1 + alpha2[n, k//group]*b2
# dualbin_linear(x, plane1, plane2, alpha1, alpha2, group, out_features, in_features, bias?)
#     x [..., in_features] fp32/bf16/fp16 -> [..., out_features] in x.dtype;
#     y = x @ W.T + bias, W = dualbin_dequantize(...), accumulated in fp32.
#     Native CPU kernel: m <= 8 rows of x use the plane bits as masks of masked adds (no
#     decode); larger m dequantize fp32 row tiles (bit-exact) for MKL sgemm. Both match the
#     reference up to summation order (and one rounding of bf16/fp16 outputs).
_lib.define(
    "dualbin_dequantize(Tensor plane1, Tensor plane2, Tensor alpha1, Tensor alpha2, int group, "
    "int rows, int cols) -> Tensor"
)
_lib.define(
    "dualbin_linear(Tensor x, Tensor plane1, Tensor plane2, Tensor alpha1, Tensor alpha2, int group, "
    "int out_features, int in_features, Tensor? bias) -> Tensor"
)


def _check_dualbin_args(plane1, plane2, alpha1, alpha2, group, rows, cols) -> None:
    """Shape/dtype checks shared by the fake and reference impls (messages name the shapes)."""
    torch._check(group > 0 and group % 16 == 0, lambda: f"group must be a positive multiple of 16, got {group}")
    g = -(-cols // group)
    row_bytes = g * group // 8
    for name, p in (("plane1", plane1), ("plane2", plane2)):
        torch._check(p.dtype == torch.uint8, lambda: f"{name} must be uint8, got {p.dtype}")
        torch._check(p.dim() == 2 and p.shape[0] == rows and p.shape[1] == row_bytes,
                     lambda: f"{name} is {list(p.shape)} but a {rows}x{cols} weight at group {group} "
                             f"needs [{rows}, {row_bytes}]")
    for name, a in (("alpha1", alpha1), ("alpha2", alpha2)):
        torch._check(a.dtype == torch.float16, lambda: f"{name} must be float16, got {a.dtype}")
        torch._check(a.dim() == 2 and a.shape[0] == rows and a.shape[1] == g,
                     lambda: f"{name} is {list(a.shape)} but a {rows}x{cols} weight at group {group} needs [{rows}, {g}]")


def dualbin_dequantize_reference(plane1, plane2, alpha1, alpha2, group, rows, cols):
    """Pure-torch reference: alpha1*b1 + alpha2*b2 per group, fp32 [rows, cols]."""
    _check_dualbin_args(plane1, plane2, alpha1, alpha2, group, rows, cols)
    g = alpha1.shape[1]
    shifts = torch.arange(8, dtype=torch.uint8, device=plane1.device)

    def bits(p):
        return ((p.unsqueeze(-1) >> shifts) & 1).reshape(rows, g, group).float()

    w = alpha1.float().unsqueeze(-1) * bits(plane1) + alpha2.float().unsqueeze(-1) * bits(plane2)
    return w.reshape(rows, g * group)[:, :cols].contiguous()


def dualbin_linear_reference(x, plane1, plane2, alpha1, alpha2, group, out_features, in_features, bias=None):
    """Pure-torch reference: (x.float() @ W.T + bias) in fp32, cast to x.dtype."""
    torch._check(x.shape[-1] == in_features,
                 lambda: f"x has last dim {x.shape[-1]} but the weight is {out_features}x{in_features}")
    w = dualbin_dequantize_reference(plane1, plane2, alpha1, alpha2, group, out_features, in_features)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


_lib.impl("dualbin_dequantize", dualbin_dequantize_reference, "CompositeExplicitAutograd")
_lib.impl("dualbin_linear", dualbin_linear_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("quantkit::dualbin_dequantize")
def _dualbin_dequantize_fake(plane1, plane2, alpha1, alpha2, group, rows, cols):
    _check_dualbin_args(plane1, plane2, alpha1, alpha2, group, rows, cols)
    return plane1.new_empty((rows, cols), dtype=torch.float32)


@torch.library.register_fake("quantkit::dualbin_linear")
def _dualbin_linear_fake(x, plane1, plane2, alpha1, alpha2, group, out_features, in_features, bias):
    torch._check(x.shape[-1] == in_features,
                 lambda: f"x has last dim {x.shape[-1]} but the weight is {out_features}x{in_features}")
    _check_dualbin_args(plane1, plane2, alpha1, alpha2, group, out_features, in_features)
    return x.new_empty((*x.shape[:-1], out_features))


# Autograd as for lut4_linear: gradients to x and bias; the packed weight is frozen.
def _dualbin_linear_setup_context(ctx, inputs, output):
    (x, plane1, plane2, alpha1, alpha2, group, out_f, in_f, bias) = inputs
    ctx.save_for_backward(plane1, plane2, alpha1, alpha2)
    ctx.meta = (group, out_f, in_f, bias is not None, x.dtype)


def _dualbin_linear_backward(ctx, grad):
    plane1, plane2, alpha1, alpha2 = ctx.saved_tensors
    group, out_f, in_f, has_bias, x_dtype = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        rows = _row_chunks.dualbin_rows(plane1, plane2, alpha1, alpha2, group, in_f)
        grad_x = _row_chunks.grad_input_by_rows(grad, out_f, in_f, rows, x_dtype)
    if has_bias and ctx.needs_input_grad[8]:
        grad_bias = grad.reshape(-1, out_f).sum(0)
    return grad_x, None, None, None, None, None, None, None, grad_bias


torch.library.register_autograd("quantkit::dualbin_linear", _dualbin_linear_backward,
                                setup_context=_dualbin_linear_setup_context)


# ----------------------------------------------------------------------------------------
# Embedding lookups on packed tables (intk_embedding, lut4_embedding): defined in their own
# module, before the native kernels register against them.
# ----------------------------------------------------------------------------------------
from quantkit import _ops_embedding  # noqa: E402,F401
from quantkit import _ops_fused  # noqa: E402,F401  (lut4_linear_multi: fused q/k/v and gate/up)


# ----------------------------------------------------------------------------------------
# Native kernels
# ----------------------------------------------------------------------------------------
KERNEL_MODE = os.environ.get("QUANTKIT_KERNEL", "auto").strip().lower()
_native_error: Optional[str] = None
REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` in the quantkit checkout"


def _load_native() -> bool:
    """Import quantkit._C (which registers CPU/CUDA kernels) according to QUANTKIT_KERNEL."""
    global _native_error
    if KERNEL_MODE not in ("auto", "torch", "native"):
        raise KernelUnavailable(f"QUANTKIT_KERNEL={KERNEL_MODE!r} is not one of auto, torch, native")
    if KERNEL_MODE == "torch":
        _native_error = "disabled by QUANTKIT_KERNEL=torch"
        return False
    try:
        from quantkit import _C  # noqa: F401  (registers TORCH_LIBRARY_IMPL kernels)
    except ImportError as e:
        _native_error = f"quantkit._C failed to import ({e}); {REBUILD_HINT}"
        if KERNEL_MODE == "native":
            raise KernelUnavailable(f"QUANTKIT_KERNEL=native but {_native_error}") from None
        return False
    return True


NATIVE_AVAILABLE = _load_native()


def native_status() -> str:
    """One line saying which implementation the ops run on this machine."""
    if NATIVE_AVAILABLE:
        return "native kernels (quantkit._C) for CPU" + (" and CUDA" if _has_cuda_kernels() else "")
    return f"pure-torch reference ({_native_error})"


def _has_cuda_kernels() -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("quantkit::lut4_linear", "CUDA"))
    except Exception:
        return False


def has_native_cpu_kernel(op: str = "lut4_linear") -> bool:
    """Whether ``quantkit::<op>`` has a registered CPU kernel (vs the reference)."""
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkit::{op}", "CPU"))


