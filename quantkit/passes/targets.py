"""Which modules a pass touches: target/ignore patterns over module names.

A pattern is either
  * ``re:<regex>``: the regex must match the whole module name (``re.fullmatch``), or
  * a plain name: matches the module with exactly that name, or any module whose name ends
    with ``.<name>`` (so ``lm_head`` matches ``lm_head`` and ``model.lm_head``, and
    ``q_proj`` matches every ``...self_attn.q_proj``).
Only ``nn.Linear`` modules are candidates; embeddings are never touched.
"""

from __future__ import annotations

import re
from functools import lru_cache

from torch import nn

from quantkit.errors import RecipeError


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern[3:])
    except (re.error, OverflowError, RecursionError, ValueError) as e:  # e.g. a{4294967296}, deep nesting
        raise RecipeError(f"invalid regex in pattern {pattern[:200]!r}: {e or type(e).__name__}") from None


def validate_patterns(patterns: tuple[str, ...], where: str) -> None:
    """Fail early (at recipe load) on empty or uncompilable patterns."""
    for p in patterns:
        if not p:
            raise RecipeError(f"{where}: empty module pattern")
        if p.startswith("re:"):
            try:
                _compile(p)
            except RecipeError as e:
                raise RecipeError(f"{where}: {e}") from None


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if _compile(p).fullmatch(name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def select_linears(model: nn.Module, targets: tuple[str, ...], ignore: tuple[str, ...],
                   scope: str = "") -> list[tuple[str, nn.Linear]]:
    """(name, module) of every plain nn.Linear matching ``targets`` and not ``ignore``.

    scope: restrict the search to the submodule of that name (e.g. ``model.layers.3`` when
    compressing block by block). Names stay full names (``model.layers.3.mlp.up_proj``), so
    a pattern selects exactly the modules it selects in a whole-model run.
    """
    root = model.get_submodule(scope) if scope else model
    return [(n, m) for n, m in root.named_modules(prefix=scope)
            if type(m) is nn.Linear and matches(n, targets) and not matches(n, ignore)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
