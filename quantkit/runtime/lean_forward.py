"""The lean forward: a decoder's blocks run from a ``DecoderPlan`` on quantkit's own KV cache.

Why: for a small model at batch 1 the transformers forward spends more time in its glue
(mask construction, cache bookkeeping, attention-interface dispatch, per-call kwargs and
output classes) than in the weights: SmolLM2-135M decodes a token in ~30 ms, of which the
210 packed linears take a fraction. This forward calls the same modules in the same order
with the same elementwise formulas, and nothing else.

    cache = KVCache.for_plan(plan, max_len, dtype)
    logits = lean_forward(plan, cache, ids, pos0)     # ids int64 [1, n] at positions pos0..

Shapes: hidden [1, n, hidden]; q [1, heads, n, head_dim]; the cache holds k and v as
[1, kv_heads, max_len, head_dim] per layer, written in place at positions pos0..pos0+n-1.
Attention reads positions [lo, pos0 + n) where lo = 0, or the window start on sliding
layers. logits: [1, vocab] for the last position, fp32 or the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch.nn import functional as F

from quantkit.runtime.decoder_plan import DecoderPlan, LayerPlan


@dataclass
class KVCache:
    """Preallocated keys/values, one [1, kv_heads, max_len, head_dim] pair per layer, and the
    RoPE (cos, sin) tables [1, max_len, head_dim] by table key."""

    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    rope: dict
    max_len: int

    @classmethod
    def for_plan(cls, plan: DecoderPlan, max_len: int, dtype: torch.dtype, device=None) -> "KVCache":
        shape = (1, plan.n_kv_heads, max_len, plan.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in plan.layers]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in plan.layers]
        return cls(keys, values, plan.rope_tables(max_len, dtype), max_len)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _sliding_mask(n: int, pos0: int, lo: int, window: int, device) -> torch.Tensor:
    """bool [n, pos0 + n - lo]: query pos0+i sees key lo+j when lo+j <= pos0+i < lo+j+window."""
    q = torch.arange(pos0, pos0 + n, device=device)[:, None]
    k = torch.arange(lo, pos0 + n, device=device)[None, :]
    return (k <= q) & (q - k < window)


def _attention(lp: LayerPlan, plan: DecoderPlan, cache: KVCache, i: int, x: torch.Tensor, pos0: int) -> torch.Tensor:
    n = x.shape[1]
    d = plan.head_dim
    q, k, v = lp.qkv(x)
    q = q.view(1, n, plan.n_heads, d).transpose(1, 2)
    k = k.view(1, n, plan.n_kv_heads, d).transpose(1, 2)
    v = v.view(1, n, plan.n_kv_heads, d).transpose(1, 2)
    if lp.q_norm is not None:
        q = lp.q_norm(q)
        k = lp.k_norm(k)
    cos_t, sin_t = cache.rope[lp.rope]
    cos = cos_t[:, pos0:pos0 + n].unsqueeze(1)
    sin = sin_t[:, pos0:pos0 + n].unsqueeze(1)
    # transformers' apply_rotary_pos_emb, term for term
    q = (q * cos) + (_rotate_half(q) * sin)
    k = (k * cos) + (_rotate_half(k) * sin)
    end = pos0 + n
    cache.keys[i][:, :, pos0:end] = k
    cache.values[i][:, :, pos0:end] = v
    lo = max(0, end - lp.window - n + 1) if lp.window else 0
    keys = cache.keys[i][:, :, lo:end]
    values = cache.values[i][:, :, lo:end]
    gqa = plan.n_heads != plan.n_kv_heads
    if n == 1:
        out = F.scaled_dot_product_attention(q, keys, values, scale=lp.scaling, enable_gqa=gqa)
    elif lp.window and end - lo > lp.window or pos0 > 0:
        mask = _sliding_mask(n, pos0, lo, lp.window or end + 1, x.device)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=lp.scaling, enable_gqa=gqa)
    else:  # a prompt from position 0 inside the window: plain causal
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=lp.scaling, enable_gqa=gqa)
    return lp.o(out.transpose(1, 2).reshape(1, n, -1))


def _block(lp: LayerPlan, plan: DecoderPlan, cache: KVCache, i: int, h: torch.Tensor, pos0: int) -> torch.Tensor:
    a = _attention(lp, plan, cache, i, lp.input_norm(h), pos0)
    if lp.sandwich:
        h = h + lp.post_attn_norm(a)
        gate, up = lp.gate_up(lp.pre_ff_norm(h))
        return h + lp.post_ff_norm(lp.down(lp.act(gate) * up))
    h = h + a
    gate, up = lp.gate_up(lp.post_attn_norm(h))
    return h + lp.down(lp.act(gate) * up)


def lean_forward(plan: DecoderPlan, cache: KVCache, ids: torch.Tensor, pos0: int) -> torch.Tensor:
    """Logits [1, vocab] of the last of ``ids`` ([1, n] int64, at positions pos0..pos0+n-1),
    writing their keys/values into ``cache``. Call under ``torch.inference_mode()``."""
    n = ids.shape[1]
    if pos0 + n > cache.max_len:
        raise ValueError(f"positions up to {pos0 + n} do not fit the cache of {cache.max_len}")
    h = plan.embed(ids)
    for i, lp in enumerate(plan.layers):
        h = _block(lp, plan, cache, i, h, pos0)
    logits = plan.head(plan.norm(h[:, -1:]))[:, -1]
    if plan.softcap is not None:
        logits = torch.tanh(logits / plan.softcap) * plan.softcap
    return logits
