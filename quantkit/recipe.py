"""Recipes: YAML files that list passes and the modules they target.

Format (see recipes/nf4.yaml for a commented example)::

    version: 1                # recipe format version (this library reads 1)
    name: nf4                 # free text, recorded in the artifact
    description: ...          # optional free text
    passes:                   # applied in order
      - pass: nf4             # a registered pass name (quantkit.passes.PASSES)
        targets: ["re:.*"]    # pass-specific keys, validated strictly
        ...

Loading is strict: unknown keys, unknown pass names and wrong types raise RecipeError
naming the file, the position, the key and the valid choices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from quantkit import _config
from quantkit.errors import RecipeError
from quantkit.passes import PASSES

RECIPE_VERSION = 1
_TOP_KEYS = ("version", "name", "description", "passes")


@dataclass(frozen=True)
class PassEntry:
    """One step of a recipe: the pass name and its validated config dataclass."""

    name: str
    config: Any

    def to_dict(self) -> dict:
        return {"pass": self.name, **_config.to_dict(self.config)}


@dataclass(frozen=True)
class Recipe:
    passes: tuple[PassEntry, ...]
    name: str = "unnamed"
    description: str = ""
    version: int = RECIPE_VERSION

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: a recipe must be a mapping with a 'passes' list, got {type(data).__name__}")
        unknown = [k for k in data if k not in _TOP_KEYS]
        if unknown:
            raise RecipeError(f"{where}: unknown key '{unknown[0]}'; valid keys: {', '.join(_TOP_KEYS)}")
        version = data.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise RecipeError(f"{where}: recipe version {version!r} is not supported; this quantkit reads "
                              f"version {RECIPE_VERSION}")
        passes = data.get("passes")
        if not isinstance(passes, list) or not passes:
            raise RecipeError(f"{where}: 'passes' must be a non-empty list of passes")
        entries = []
        for i, p in enumerate(passes):
            here = f"{where}: passes[{i}]"
            if not isinstance(p, dict) or "pass" not in p:
                raise RecipeError(f"{here}: each pass needs a 'pass' key naming one of: {', '.join(PASSES)}")
            name = p["pass"]
            if not isinstance(name, str) or name not in PASSES:
                raise RecipeError(f"{here}: unknown pass {name!r}; valid passes: {', '.join(PASSES)}")
            cfg = _config.from_dict(PASSES[name].config_cls, p, f"{here} ({name})", ignore=("pass",))
            entries.append(PassEntry(name, cfg))
        for key in ("name", "description"):
            if key in data and not isinstance(data[key], str):
                raise RecipeError(f"{where}: '{key}' must be a string, got {data[key]!r}")
        return cls(tuple(entries), data.get("name", "unnamed"), data.get("description", ""), version)

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "Recipe":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"recipe file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"cannot read recipe {path}: {e}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
        except (ValueError, OverflowError, RecursionError, TypeError) as e:  # e.g. a bad date or !!float tag
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise RecipeError(f"{path}: not valid YAML: {first}") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict:
        return {"version": self.version, "name": self.name, "description": self.description,
                "passes": [p.to_dict() for p in self.passes]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)


def shipped_recipes_dir() -> Path:
    """The repository's ``recipes/`` folder (next to the quantkit package)."""
    return Path(__file__).resolve().parent.parent / "recipes"


def load_recipe(recipe: Union[str, Path, Recipe, dict]) -> Recipe:
    """A Recipe from an object, a dict, a YAML path, or a shipped recipe name (``nf4``)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    path = Path(recipe)
    if not path.exists() and not path.suffix:
        shipped = shipped_recipes_dir() / f"{recipe}.yaml"
        if shipped.exists():
            path = shipped
        else:
            names = sorted(p.stem for p in shipped_recipes_dir().glob("*.yaml"))
            raise RecipeError(f"recipe {str(recipe)!r} is neither a file nor a shipped recipe; "
                              f"shipped: {', '.join(names) or 'none'}")
    return Recipe.from_yaml(path)
