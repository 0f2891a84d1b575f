"""Strict dict -> frozen dataclass conversion, shared by every config in quantkit.

Every error names where the value came from (``where``, e.g. "recipes/nf4.yaml: passes[0]"),
the offending key, and the valid choices, because recipe typos are the most common user
error and a silent default is worse than a stop.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from quantkit.errors import RecipeError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; lists become tuples (configs are frozen)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, key)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(f"{where}: '{key}' must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise RecipeError(f"{where}: '{key}' must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: '{key}' must be a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, where, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r}")  # a bug in quantkit, not user input


def from_dict(cls: type, data: Mapping[str, Any], where: str, ignore: tuple[str, ...] = ()):
    """Build frozen dataclass ``cls`` from ``data``; unknown or mistyped keys raise RecipeError."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields and k not in ignore]
    if unknown:
        raise RecipeError(f"{where}: unknown key '{unknown[0]}'; valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], where, name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{where}: missing required key '{name}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ range checks
        raise RecipeError(f"{where}: {e}") from None


def to_dict(obj) -> dict:
    """Dataclass -> plain dict (tuples become lists) for YAML/JSON round trips."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
