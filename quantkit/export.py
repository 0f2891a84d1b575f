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
this file derives ``SUPPORTED`` from those tables. Imports run one way: this file imports the
targets, the targets import ``quantkit/io/export_checks.py``, and nothing imports back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from quantkit.errors import UsageError
from quantkit.io import export_checks
from quantkit.io.export_checks import check_export_paths

TARGETS = ("hf-bnb", "onnx")


def supported_formats(target: str) -> dict[str, str]:
    """{module format: what it becomes} for ``target`` (raises UsageError for an unknown target)."""
    if target == "hf-bnb":
        from quantkit.io import hf_bnb
        return hf_bnb.supported_formats()
    if target == "onnx":
        from quantkit.io import onnx_export
        return onnx_export.supported_formats()
    raise UsageError(f"unknown export target {target!r}; valid targets: {', '.join(TARGETS)}")


def check_exportable(modules: dict, target: str) -> None:
    """Refuse (UsageError) if any packed module's format cannot be expressed by ``target``
    (see ``quantkit.io.export_checks.check_exportable``)."""
    export_checks.check_exportable(modules, target, supported_formats(target))


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
