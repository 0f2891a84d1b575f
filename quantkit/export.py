"""Deployment export: turn a quantkit artifact (what ``compress`` writes) into a folder that
another runtime loads directly.

    quantkit.export(OUT, to="hf-bnb", dest=DEST)   transformers + bitsandbytes (Linear4bit)
    quantkit.export(OUT, to="onnx", dest=DEST)     ONNX Runtime (com.microsoft::MatMulBnb4)

Which packed formats each target can express is the table ``SUPPORTED`` below; an artifact
holding any other format is refused before anything is written, with an error naming the
module, its format and what the target supports. DEST is written through
``atomic_output_dir``: it must not exist unless ``overwrite``, and it is never left
half-written. See docs/export.md.

Adding a format to a target is one function in that target's module (``hf_bnb.py``:
a checker that returns the format's ``BitsAndBytesConfig`` arguments; ``onnx_export.py``:
a converter returning an export-ready ``nn.Module``) plus one entry in its table there;
this file derives ``SUPPORTED`` from those tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from quantkit.errors import UsageError

TARGETS = ("hf-bnb", "onnx")


def supported_formats(target: str) -> dict[str, str]:
    """{module format: what it becomes} for ``target`` (raises UsageError for an unknown target)."""
    if target == "hf-bnb":
        from quantkit.io.hf_bnb import HF_BNB_FORMATS
        return {fmt: desc for fmt, (desc, _) in HF_BNB_FORMATS.items()}
    if target == "onnx":
        from quantkit.io.onnx_export import ONNX_FORMATS
        return {fmt: desc for fmt, (desc, _) in ONNX_FORMATS.items()}
    raise UsageError(f"unknown export target {target!r}; valid targets: {', '.join(TARGETS)}")


def _module_type(fmt: str) -> str:
    from quantkit.nn import PACKED_MODULES
    cls = PACKED_MODULES.get(fmt)
    return cls.__name__ if cls is not None else "unknown module type"


def check_exportable(modules: dict, target: str) -> None:
    """Refuse (UsageError) if any packed module's format cannot be expressed by ``target``.

    ``modules`` is the artifact's ``quantkit.modules`` table {name: spec}. The message names
    the first offending module, its type and format, how many others share the problem, and
    the formats the target supports.
    """
    supported = supported_formats(target)
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


def export(out: Union[str, Path], to: str, dest: Union[str, Path], overwrite: bool = False,
           memory_budget: Union[int, str, None] = None) -> Path:
    """Export the artifact ``out`` to ``dest`` for target ``to`` ("hf-bnb" or "onnx"); returns ``dest``.

    Raises UsageError for an unknown target, a missing ``out``, an existing ``dest``
    (unless ``overwrite``) or a format the target cannot express; FormatError when a module
    fails to convert (the message names it). ``memory_budget`` (onnx only) exports the model
    as ``quantkit.load(out, memory_budget=...)`` loads it: a BitStack artifact keeps the
    blocks that fit.
    """
    if to not in TARGETS:
        raise UsageError(f"unknown export target {to!r}; valid targets: {', '.join(TARGETS)}")
    out, dest = check_export_paths(out, dest, overwrite)
    if to == "hf-bnb":
        if memory_budget is not None:
            raise UsageError("a memory budget applies to onnx export (BitStack blocks); hf-bnb exports nf4/fp4 "
                             "layers as stored")
        from quantkit.io.hf_bnb import export_hf_bnb
        return export_hf_bnb(out, dest, overwrite=overwrite)
    from quantkit.io.onnx_export import export_onnx
    return export_onnx(out, dest, overwrite=overwrite, memory_budget=memory_budget)
