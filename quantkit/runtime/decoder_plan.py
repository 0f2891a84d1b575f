"""Which modules of a transformers decoder the lean forward calls, read off the model once.

``plan_decoder(model)`` returns a ``DecoderPlan`` for the architectures the lean forward
(``quantkit/runtime/lean_forward.py``) implements, or a string saying why not:

    llama, qwen2, mistral   pre-norm blocks: h += attn(norm(h)); h += mlp(norm(h))
    gemma3_text             sandwich blocks: h += norm(attn(norm(h))); h += norm(mlp(norm(h))),
                            per-head q/k norms, sliding-window layers with their own RoPE

The plan holds the model's own module objects (norms, the activation) and its linears of any
packed format bound to their ops (``bind``), so numerics per op are the model's; only the
glue (masks, cache bookkeeping, kwargs plumbing, module-call machinery) is replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from quantkit.runtime.model_info import model_device

LLAMA_LIKE = ("llama", "qwen2", "mistral")
SANDWICH = ("gemma3_text",)
# RoPE types whose inverse frequencies do not depend on the sequence length (a position's
# cos/sin can be tabulated once); "dynamic" and "longrope" rescale with the length.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class LayerPlan:
    """One decoder block. Norms/linears are the model's modules; ``window``: sliding-window
    length (keys at positions > p - window are seen from p) or None; ``rope``: key of the
    layer's cos/sin table in ``DecoderPlan.rope_tables``; ``sandwich``: Gemma-style norms
    after attention and around the MLP."""

    input_norm: nn.Module
    qkv: Callable  # x -> (q, k, v) projections
    o: Callable
    post_attn_norm: nn.Module
    gate_up: Callable  # x -> (gate, up) projections
    down: Callable
    act: Callable
    q_norm: Optional[nn.Module]
    k_norm: Optional[nn.Module]
    pre_ff_norm: Optional[nn.Module]
    post_ff_norm: Optional[nn.Module]
    window: Optional[int]
    rope: Optional[str]
    scaling: float
    sandwich: bool


@dataclass(frozen=True)
class DecoderPlan:
    """The whole model: embedding, blocks, final norm, head; head counts and dims; a
    callable giving each RoPE table's (cos, sin) [1, T, head_dim] for positions 0..T-1."""

    embed: nn.Module
    layers: Tuple[LayerPlan, ...]
    norm: nn.Module
    head: Callable
    n_heads: int
    n_kv_heads: int
    head_dim: int
    softcap: Optional[float]
    rope_tables: Callable[[int, torch.dtype], dict]


def plan_decoder(model: nn.Module) -> Union[DecoderPlan, str]:
    """The plan for ``model`` (a ``*ForCausalLM``), or why the lean forward cannot run it."""
    cfg = model.config
    mtype = getattr(cfg, "model_type", None)
    if mtype not in LLAMA_LIKE + SANDWICH:
        return f"the lean decode step knows {', '.join(LLAMA_LIKE + SANDWICH)}, not {mtype!r}"
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if inner is None or head is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return f"{type(model).__name__} does not have the model.layers / lm_head / rotary_emb layout"
    rotary = inner.rotary_emb
    types = getattr(rotary, "rope_type", "default")  # Gemma3: a dict by layer type
    for t in (types.values() if isinstance(types, dict) else [types]):
        if t not in STATIC_ROPE:
            return f"RoPE type {t!r} rescales with the sequence length"
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping is not implemented in the lean step"
    sandwich = mtype in SANDWICH
    layer_types = getattr(cfg, "layer_types", None)
    layers = []
    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        window = getattr(attn, "sliding_window", None)
        rope = layer_types[i] if sandwich and layer_types is not None else None
        try:
            layers.append(LayerPlan(
                input_norm=layer.input_layernorm, qkv=bind_group(attn.q_proj, attn.k_proj, attn.v_proj),
                o=bind(attn.o_proj), post_attn_norm=layer.post_attention_layernorm,
                gate_up=bind_group(mlp.gate_proj, mlp.up_proj), down=bind(mlp.down_proj), act=mlp.act_fn,
                q_norm=attn.q_norm if sandwich else None, k_norm=attn.k_norm if sandwich else None,
                pre_ff_norm=layer.pre_feedforward_layernorm if sandwich else None,
                post_ff_norm=layer.post_feedforward_layernorm if sandwich else None,
                window=int(window) if window else None, rope=rope, scaling=float(attn.scaling),
                sandwich=sandwich))
        except AttributeError as e:
            return f"layer {i} does not have the expected modules ({e})"
    head_dim = getattr(inner.layers[0].self_attn, "head_dim", None) if layers else None
    head_dim = head_dim or cfg.hidden_size // cfg.num_attention_heads

    def rope_tables(n: int, dtype: torch.dtype) -> dict:
        # the model's own rotary module on positions 0..n-1: each entry is an elementwise
        # function of (position, frequency), so a row of this table equals what the module
        # gives for that position alone
        pos = torch.arange(n, device=model_device(model))[None]
        probe = torch.empty(1, 1, 1, dtype=dtype, device=pos.device)
        keys = sorted({lp.rope for lp in layers})
        if keys == [None]:
            return {None: rotary(probe, pos)}
        return {k: rotary(probe, pos, k) for k in keys}

    return DecoderPlan(embed=inner.embed_tokens, layers=tuple(layers), norm=inner.norm, head=bind(head),
                       n_heads=int(cfg.num_attention_heads), n_kv_heads=int(cfg.num_key_value_heads),
                       head_dim=int(head_dim), softcap=getattr(cfg, "final_logit_softcapping", None),
                       rope_tables=rope_tables)


def bind(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> module(x) without nn.Module's call machinery and, for quantkit's packed layers, with
    the op and its packed arguments resolved once (``bound_forward``). A plan is built per
    generate call, so a binding never outlives the tensors it captured."""
    if hasattr(module, "bound_forward"):
        return module.bound_forward()
    if type(module) is nn.Linear:
        w, b = module.weight, module.bias
        return lambda x: F.linear(x, w, b)
    return module


def bind_group(*modules: nn.Module) -> Callable[[torch.Tensor], tuple]:
    """x -> (m(x) for m in modules) for projections of the same input: one fused op call
    where the format has one (``bound_group``: nf4/fp4 via lut4_linear_multi), else each
    module's bound forward in turn."""
    for m in modules:
        group = getattr(type(m), "bound_group", None)
        if group is not None:
            fused = group(list(modules))
            if fused is not None:
                return fused
            break
    fns = [bind(m) for m in modules]
    return lambda x: tuple(f(x) for f in fns)
