"""The Python entry points behind ``quantkit compress`` (see quantkit/__init__.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from quantkit.errors import UsageError
from quantkit.passes import PASSES
from quantkit.recipe import Recipe, load_recipe


def load_model(spec: Union[str, Path], dtype=None, memory_budget: Union[int, str, None] = None) -> nn.Module:
    """Load a model by name or path: a quantkit artifact, an HF folder, a .gguf, or
    ``smollm2-135m``. Its tokenizer (if any) rides along as ``model._quantkit_tokenizer``.
    memory_budget: only for artifacts (see ``quantkit.load``)."""
    import torch

    from quantkit.io import artifact
    from quantkit.models.loading import load_source_model, resolve_model_source

    source = resolve_model_source(str(spec))
    if source.kind == "quantkit-artifact":
        model = artifact.load(source.path, memory_budget=memory_budget)
        tokenizer = artifact.load_tokenizer(source.path)
    else:
        if memory_budget is not None:
            raise UsageError(f"a memory budget applies to quantkit artifacts only; {spec} is a {source.kind}")
        model, tokenizer = load_source_model(source, dtype=dtype or torch.float32)
    model._quantkit_tokenizer = tokenizer
    return model


def compress(model_or_path: Union[nn.Module, str, Path], recipe: Union[Recipe, str, Path, dict], *,
             tokenizer=None, calib: Any = None, inplace: bool = False, progress: bool = True,
             allow_empty: bool = False, allow_nonfinite: bool = False, calib_text: Optional[str] = None) -> nn.Module:
    """Apply ``recipe``'s passes to a model and return the compressed model.

    model_or_path: an ``nn.Module`` (copied first unless ``inplace``) or anything
        ``load_model`` accepts. recipe: a Recipe, a dict, a YAML path or a shipped name.
    tokenizer: the model's tokenizer (a transformers tokenizer), for calibrated passes and
        saved with the artifact by ``quantkit.save``; default the one ``load_model`` attached.
    calib: data for calibrated passes (DB-LLM, BitStack): a text, a list of texts, a
        ``datasets.Dataset`` with a "text" column, or a LongTensor of token ids ([T] or
        [N, L], read as one stream). Default: the shipped text each pass names
        (``default_calib_text``; the 120 KB excerpt unless a pass says otherwise, BitStack's
        recipe: the 1 MB text). Windows start with BOS when the tokenizer adds one by default.
    calib_text: the older spelling of ``calib`` for one text.
    Raises UsageError if a pass matches no module (unless ``allow_empty``), for calibration
    data of another kind, or text with no tokenizer; QuantkitError if a weight holds NaN/Inf
    (unless ``allow_nonfinite``).
    """
    from quantkit.calibration import calib_source
    from quantkit.models.loading import check_finite

    recipe = load_recipe(recipe)
    if isinstance(model_or_path, nn.Module):
        model = model_or_path if inplace else copy.deepcopy(model_or_path)
    else:
        model = load_model(model_or_path)
    if not allow_nonfinite:
        check_finite(model)
    # built before any pass runs, so bad calibration data is refused before minutes of work
    source = (calib_source(model, calib_text, tokenizer=tokenizer, calib=calib)
              if any(PASSES[e.name].calibrated for e in recipe.passes) else None)
    for i, entry in enumerate(recipe.passes):
        spec = PASSES[entry.name]
        if spec.calibrated:
            changed = spec.apply(model, entry.config, progress=progress, calib=source.for_config(entry.config))
        else:
            changed = spec.apply(model, entry.config, progress=progress)
        if not changed and not allow_empty and not spec.may_match_nothing:
            raise UsageError(f"recipe {recipe.name!r} pass {i} ({entry.name}) matched no module; check its "
                             "targets/ignore patterns (or pass allow_empty=True / --allow-empty)")
    model._quantkit_recipe = recipe
    if tokenizer is not None:
        model._quantkit_tokenizer = tokenizer  # quantkit.save writes it beside the weights
    return model
