"""BitStack's ``ppl`` block order: the reference's level-major validation-perplexity ranking.

For each level b = 1 .. levels, with every layer at b blocks, one block is added to one
layer, the validation NLL is measured, and the block is taken out again; each level's blocks
are sorted by that NLL (lowest first) and the levels are concatenated. That is one
evaluation per decomposed linear and level (210 per level on SmolLM2-135M).

Why the suffix replay (``SuffixNLL``): changing a linear inside decoder layer L leaves the
inputs of layers 0..L unchanged, so an evaluation only has to run layers L..end, the final
norm and the head from layer L's cached input. On SmolLM2-135M that is about 0.58 of a full
forward on average (the head is ~12 % of it). The replay reuses exactly the arguments the
model's own forward gave each layer (rotary tables, mask), and each level checks that
replaying from the middle layer reproduces the full forward's NLL; where it does not (a
model whose forward does more after its layers than norm and head), ranking falls back to
full forwards, which is always correct.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from torch import nn

from quantkit.formats import bitstack
from quantkit.models.block_inputs import replay_kwargs
from quantkit.passes.targets import replace_module
from quantkit.progress import progress_bar

REPLAY_RTOL = 1e-5  # relative NLL difference tolerated between replay and full forward


def _nll_sum(logits: torch.Tensor, row: torch.Tensor) -> float:
    """Σ next-token NLL (nats) of one window: logits [1, tokens, vocab], row int64 [tokens]."""
    return float(nn.functional.cross_entropy(logits[0, :-1].float(), row[1:], reduction="sum"))


@torch.no_grad()
def val_nll(model: nn.Module, val_ids: torch.Tensor) -> float:
    """Mean next-token NLL (nats) of ``model`` over the rows of ``val_ids`` (int64 [rows, tokens]),
    one row per forward."""
    total = sum(_nll_sum(model(row[None], use_cache=False).logits, row) for row in val_ids)
    return total / (val_ids.shape[0] * (val_ids.shape[1] - 1))


class SuffixNLL:
    """Validation NLL of a Llama-style causal LM (``model.model.layers``, ``model.model.norm``,
    ``model.lm_head``) recomputed from one decoder layer on, from the inputs ``snapshot``
    recorded. ``layer_of(name)`` says which layer a module belongs to (None: outside them)."""

    def __init__(self, model: nn.Module, val_ids: torch.Tensor):
        self.model, self.val_ids = model, val_ids
        self.layers = model.model.layers
        self.norm, self.head = model.model.norm, model.lm_head
        prefixes = {id(layer): i for i, layer in enumerate(self.layers)}
        self._prefix = {}
        for name, module in model.named_modules():
            if id(module) in prefixes:
                self._prefix[name + "."] = prefixes[id(module)]
        self._cache: list[list[tuple[torch.Tensor, dict[str, Any]]]] = []

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """True when ``model`` has the Llama-style attributes the replay needs."""
        inner = getattr(model, "model", None)
        return (isinstance(getattr(inner, "layers", None), nn.ModuleList) and len(inner.layers) > 0
                and isinstance(getattr(inner, "norm", None), nn.Module)
                and isinstance(getattr(model, "lm_head", None), nn.Module))

    def layer_of(self, name: str) -> Optional[int]:
        for prefix, i in self._prefix.items():
            if name.startswith(prefix):
                return i
        return None

    @torch.no_grad()
    def snapshot(self) -> float:
        """Run the full model on every row (``val_nll``), keeping each layer's input and keyword
        arguments; returns that NLL."""
        seen: list[tuple[torch.Tensor, dict[str, Any]]] = []

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.append((hidden.detach(), replay_kwargs(kwargs)))

        handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in self.layers]
        try:
            nll = val_nll(self.model, self.val_ids)
        finally:
            for h in handles:
                h.remove()
        n = len(self.layers)
        if len(seen) != n * len(self.val_ids):
            raise RuntimeError("the model's forward did not call every decoder layer once per window")
        self._cache = [seen[i * n:(i + 1) * n] for i in range(len(self.val_ids))]
        return nll

    @torch.no_grad()
    def nll_from(self, first: int) -> float:
        """NLL with layers ``first``.. re-run on the inputs the last ``snapshot`` recorded."""
        total = 0.0
        for row, cache in zip(self.val_ids, self._cache):
            h = cache[first][0]
            for i in range(first, len(self.layers)):
                out = self.layers[i](h, **cache[i][1])
                h = out[0] if isinstance(out, tuple) else out
            total += _nll_sum(self.head(self.norm(h)), row)
        return total / (self.val_ids.shape[0] * (self.val_ids.shape[1] - 1))


class DenseView(nn.Module):
    """Stand-in for a BitStackLinear during ranking: a cached dense Ŵ_b, swapped per level."""

    def __init__(self, weight: torch.Tensor, bias):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _replay_or_none(model: nn.Module, val_ids: torch.Tensor, replay: bool) -> Optional[SuffixNLL]:
    if not replay or not SuffixNLL.supports(model):
        return None
    return SuffixNLL(model, val_ids)


@torch.no_grad()
def ppl_order(model: nn.Module, mods: dict, val_ids: torch.Tensor, levels: int, progress: bool,
              replay: bool = True) -> list[tuple[str, int]]:
    """The level-major perplexity ranking for levels 1..levels (block index = level).

    mods: {module name: BitStackLinear} of ``model``; val_ids: int64 [rows, tokens].
    replay: evaluate by suffix replay where the model allows it (same order as full forwards,
    within float rounding; see the module docstring). Returns [(module name, block index)].
    """
    views = {}
    for name, mod in mods.items():
        views[name] = DenseView(bitstack.reconstruct(mod.packed(), 1), mod.bias)
        replace_module(model, name, views[name])
    suffix = _replay_or_none(model, val_ids, replay)
    order = []
    try:
        for level in range(1, levels + 1):
            cur = {n: v.weight for n, v in views.items()}
            nxt = {n: bitstack.reconstruct(mods[n].packed(), level + 1) for n in mods}
            if suffix is not None:
                full = suffix.snapshot()
                mid = len(suffix.layers) // 2
                again = suffix.nll_from(mid)
                if not abs(again - full) <= REPLAY_RTOL * max(abs(full), 1e-12):
                    warnings.warn(f"bitstack ranking: replaying from layer {mid} gives NLL {again:.6f}, the full "
                                  f"forward {full:.6f}; ranking with full forwards instead", stacklevel=2)
                    suffix = None
            scores = []
            for name in progress_bar(list(mods), desc=f"bitstack ppl ranking, level {level}", disable=not progress):
                views[name].weight = nxt[name]
                first = suffix.layer_of(name) if suffix is not None else None
                nll = suffix.nll_from(first) if first is not None else val_nll(model, val_ids)
                scores.append((nll, name))
                views[name].weight = cur[name]
            order += [(name, level) for nll, name in sorted(scores, key=lambda t: (math.isnan(t[0]), t[0]))]
            for name in mods:
                views[name].weight = nxt[name]
    finally:
        for name, mod in mods.items():
            replace_module(model, name, mod)
    return order
