"""The ``nf4`` and ``fp4`` passes: post-training 4-bit quantization, bitsandbytes format.

Rewrites every matching ``nn.Linear`` into ``quantkit.nn.Lut4Linear``. Needs no
calibration data: each block's scale is its absolute maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantkit.formats import lut4
from quantkit.nn.lut4_linear import Lut4Linear
from quantkit.passes.targets import replace_module, select_linears, validate_patterns
from quantkit.progress import progress_bar


@dataclass(frozen=True)
class Lut4PassConfig:
    """Recipe keys of the nf4/fp4 passes.

    targets: module-name patterns to quantize (see passes/targets.py); default every Linear.
    ignore: patterns to leave alone; default the output head (as bnb/transformers do).
    blocksize: elements per absmax block, one of 32..4096 (powers of two); QLoRA uses 64.
    double_quant: quantize the absmax vector to 8 bits (bnb compress_statistics), saving
        ~0.37 bits/weight at blocksize 64.
    """

    targets: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = ("lm_head",)
    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self) -> None:
        lut4.check_blocksize(self.blocksize)
        validate_patterns(self.targets, "targets")
        validate_patterns(self.ignore, "ignore")


def apply(model: nn.Module, cfg: Lut4PassConfig, quant_type: str, progress: bool = True,
          scope: str = "") -> list[str]:
    """Quantize matching linears in place of ``model``; returns the replaced module names.

    scope: only modules inside the submodule of that name (streaming compress calls this once
    per decoder block); the result for each module is the same as in a whole-model call.
    """
    chosen = select_linears(model, cfg.targets, cfg.ignore, scope)
    for name, linear in progress_bar(chosen, desc=quant_type, disable=not progress):
        replace_module(model, name, Lut4Linear.from_linear(linear, quant_type, cfg.blocksize, cfg.double_quant))
    return [n for n, _ in chosen]
