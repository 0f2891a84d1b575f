"""Checks every export target runs before it reads or writes anything (quantkit/export.py
dispatches to the targets in quantkit/io/; the targets import this module, never export.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from quantkit.errors import UsageError


def _module_type(fmt: str) -> str:
    from quantkit.nn import PACKED_MODULES
    cls = PACKED_MODULES.get(fmt)
    return cls.__name__ if cls is not None else "unknown module type"


def check_exportable(modules: dict, target: str, supported: dict) -> None:
    """Refuse (UsageError) if any packed module's format is not in ``supported`` ({format:
    what it becomes}, the target's own table).

    ``modules`` is the artifact's ``quantkit.modules`` table {name: spec}. The message names
    the first offending module, its type and format, how many others share the problem, and
    the formats the target supports.
    """
    bad = [(name, spec) for name, spec in modules.items() if spec.get("format") not in supported]
    if not bad:
        return
    name, spec = bad[0]
    fmt = spec.get("format")
    variant = f"/{spec['quant_type']}" if spec.get("quant_type") else ""
    more = f" (and {len(bad) - 1} more module(s))" if len(bad) > 1 else ""
    valid = "; ".join(f"{f} ({d})" for f, d in supported.items())
    raise UsageError(f"cannot export module {name} ({_module_type(fmt)}, format {fmt}{variant}){more} to "
                     f"{target}: {target} supports only {valid}")


def check_export_paths(out: Union[str, Path], dest: Union[str, Path], overwrite: bool) -> tuple[Path, Path]:
    """Refuse a missing artifact, an existing ``dest`` (unless ``overwrite``) or ``dest == out``,
    before anything is loaded. Shared by ``export`` and every target's exporter."""
    out, dest = Path(out), Path(dest)
    if not out.is_dir():
        raise UsageError(f"{out} does not exist or is not a folder")
    if dest.exists() and not overwrite:
        raise UsageError(f"output {dest} already exists; pass --overwrite (overwrite=True) to replace it")
    if dest.resolve() == out.resolve():
        raise UsageError(f"export destination {dest} is the artifact itself; choose another folder")
    return out, dest
