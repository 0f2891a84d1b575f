"""prepare / step / convert: the QAT calls a training script makes (see quantkit/qat/__init__.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from quantkit.errors import UsageError
from quantkit.passes.qat import QATPassConfig, resolve_point
from quantkit.passes.targets import replace_module, select_linears
from quantkit.qat.modules import QATLinear
from quantkit.qat.convert import convert_module, qat_linear_for  # noqa: F401  (also part of this API)
from quantkit.qat.schedule import QATPlan
from quantkit.recipe import Recipe, load_recipe


def prepare(model: nn.Module, recipe: Union[str, Path, Recipe, dict], *, plan: Optional[QATPlan] = None,
            total_steps: Optional[int] = None) -> nn.Module:
    """Replace the recipe's target linears (in place) by fake-quantizing ``QATLinear``s.

    recipe: a YAML path, a shipped recipe name (``qat-int4``), a Recipe or a dict whose passes
    are all ``qat`` passes. plan: supplies ``start: plan`` (its ``qat_start``) and the run
    length for fractional start/end; default: the plan most recently made by
    ``quantkit.qat.plan`` in this process, used only for keys that need one (so
    ``prepare(model, recipe)`` right after ``plan(...)`` does what the README shows).
    total_steps: the run length when there is no plan. The modules
    start in full precision; call ``step(model, step)`` each training step. Call it before
    wrapping the model in DDP/FSDP and before building the optimizer (α are new parameters).
    Returns ``model``.
    """
    recipe = load_recipe(recipe)
    bad = [e.name for e in recipe.passes if e.name != "qat"]
    if bad:
        raise UsageError(f"quantkit.qat.prepare takes recipes of 'qat' passes only; recipe {recipe.name!r} has "
                         f"{bad[0]!r} (apply post-training passes with quantkit.compress)")
    if plan is not None and total_steps is not None and plan.total_steps != total_steps:
        raise UsageError(f"total_steps={total_steps} disagrees with the plan's {plan.total_steps}")
    if plan is None:
        from quantkit.qat.schedule import last_plan

        plan = last_plan()
        if plan is not None and total_steps is not None:
            plan = None if plan.total_steps != total_steps else plan
    run_steps = total_steps if total_steps is not None else (plan.total_steps if plan is not None else None)
    plan_start = plan.qat_start if plan is not None else None
    changed = 0
    for i, entry in enumerate(recipe.passes):
        cfg = entry.config
        start = resolve_point(cfg.start, "start", run_steps, plan_start)
        end = resolve_point(cfg.end, "end", run_steps, plan_start) if not (
            isinstance(cfg.end, float) and cfg.end == 1.0) else None
        if end is not None and end <= start:
            raise UsageError(f"recipe {recipe.name!r} pass {i}: end (step {end}) must come after start (step {start})")
        chosen = select_linears(model, cfg.targets, cfg.ignore)
        if not chosen:
            raise UsageError(f"recipe {recipe.name!r} pass {i} (qat) matched no nn.Linear; check targets/ignore")
        for name, linear in chosen:
            replace_module(model, name, qat_linear_for(linear, cfg, start, end))
        changed += len(chosen)
    model._quantkit_recipe = recipe
    return model


def qat_modules(model: nn.Module) -> dict[str, QATLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QATLinear)}


def step(model: nn.Module, step: int) -> bool:
    """Set every QAT module's phase for training step ``step`` (0-based); call it before the
    step's forward. Returns whether any module fake-quantizes at this step. Deterministic in
    ``step``, so every data-parallel rank switches at the same step."""
    mods = qat_modules(model)
    if not mods:
        raise UsageError("quantkit.qat.step: the model has no QAT modules; call quantkit.qat.prepare first")
    return any([m.set_step(int(step)) != 0 for m in mods.values()])


def convert(model: nn.Module) -> nn.Module:
    """Replace every QATLinear (in place) by the packed module of its quantized weight: the
    same modules, kernels and artifact format as the PTQ passes (``quantkit.save`` works).
    A module whose QAT never started is rounded to nearest with its initial scales. Packing
    runs on CPU; each packed module is then moved to its weight's device. Returns ``model``."""
    mods = qat_modules(model)
    if not mods:
        raise UsageError("quantkit.qat.convert: the model has no QAT modules; call quantkit.qat.prepare first")
    for name, m in mods.items():
        replace_module(model, name, convert_module(m).to(m.weight.device))
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups that keep weight decay off the quantizer scales α (and off 1-D
    parameters: norms, biases), as LSQ/ParetoQ train them."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith("quantizer.alpha") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
