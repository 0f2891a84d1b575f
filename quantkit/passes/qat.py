"""The ``qat`` pass: quantization-aware training of linear weights (quantkit.qat).

In a training script the pass is used through the Python API::

    model = quantkit.qat.prepare(model, "recipes/qat-int4.yaml", plan=plan)  # fake-quant linears
    ...  quantkit.qat.step(model, step) every step  ...
    model = quantkit.qat.convert(model)                                     # packed modules

``quantkit compress MODEL --recipe recipes/qat-int4.yaml`` (or ``quantkit.compress``) has no
training loop to run, so there the pass prepares and converts at once: every target becomes
the packed module QAT would produce, with the quantizer's initial scales (round-to-nearest
with a per-row MSE-searched clip for the int grids, exactly the PTQ pass for nf4/fp4). That
is the "QAT fraction 0" baseline of the same format, not a trained result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from torch import nn

from quantkit.formats import lut4
from quantkit.passes.targets import validate_patterns

QUANTIZERS = ("auto", "lsq", "sign", "seq", "ternary", "nf4", "fp4", "dualbin")


@dataclass(frozen=True)
class QATPassConfig:
    """Recipe keys of the ``qat`` pass.

    bits: weight bits, 1..8 (nf4/fp4: 4).
    quantizer: auto | lsq | sign | seq | ternary | nf4 | fp4. auto picks ParetoQ's choice
        for ``bits``: 1 -> sign (sign(w)·α), 2 -> seq (stretched elastic, levels ±α/4, ±3α/4),
        3..8 -> lsq (symmetric integers, learnable step). lsq takes bits 2..8, sign 1, seq
        and ternary 2 (ternary stores its three levels in 2 bits). dualbin (bits 2): DB-LLM's
        two binary planes with learnable α1/α2 per group of ``blocksize`` weights along K;
        converts to the ``dualbin`` format (2.5 bits/weight at group 64).
    targets / ignore: module-name patterns as in every pass (default: every Linear but lm_head).
    start: when fake quantization switches on: "plan" (the plan's qat_start, the default),
        a fraction of the run's steps (a float in [0, 1], e.g. 0.8) or a step number (an int).
        YAML ``1`` is the step 1, ``1.0`` the fraction 1.0.
    end: from this point the quantized weights are frozen at their value then (later
        optimizer steps do not change them): a fraction (float in [0, 1]) or a step (int).
        The default 1.0 (the end of the run) never freezes.
    blocksize / double_quant: nf4/fp4 as in the nf4/fp4 passes; blocksize is also the dualbin
        group (weights per α1/α2 pair along K; default 64).
    """

    bits: int = 4
    quantizer: str = "auto"
    targets: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = ("lm_head",)
    start: Union[int, float, str] = "plan"
    end: Union[int, float] = 1.0
    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"'quantizer' must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"'bits' must be 1..8, got {self.bits}")
        allowed = {"lsq": range(2, 9), "sign": (1,), "seq": (2,), "ternary": (2,), "nf4": (4,), "fp4": (4,),
                   "dualbin": (2,)}
        if self.quantizer != "auto" and self.bits not in allowed[self.quantizer]:
            ok = allowed[self.quantizer]
            raise ValueError(f"quantizer {self.quantizer!r} takes bits {ok[0]}..{ok[-1]}, got {self.bits}"
                             if len(ok) > 1 else f"quantizer {self.quantizer!r} takes bits {ok[0]}, got {self.bits}")
        _check_point(self.start, "start", allow_plan=True)
        _check_point(self.end, "end", allow_plan=False)
        if self.blocksize not in lut4.VALID_BLOCKSIZES:
            raise ValueError(f"'blocksize' must be one of {', '.join(map(str, lut4.VALID_BLOCKSIZES))}, "
                             f"got {self.blocksize}")
        validate_patterns(self.targets, "targets")
        validate_patterns(self.ignore, "ignore")

    @property
    def grid(self) -> str:
        from quantkit.qat.quantizers import default_grid

        return default_grid(self.bits) if self.quantizer == "auto" else self.quantizer


def _check_point(value, key: str, allow_plan: bool) -> None:
    if isinstance(value, str):
        if not (allow_plan and value == "plan"):
            choices = '"plan", a fraction in [0, 1] or a step' if allow_plan else "a fraction in [0, 1] or a step"
            raise ValueError(f"'{key}' must be {choices}, got {value!r}")
    elif isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"'{key}' as a fraction must lie in [0, 1], got {value} (write a step as an int)")
    elif value < 0:
        raise ValueError(f"'{key}' as a step must be >= 0, got {value}")


def resolve_point(value, key: str, total_steps, plan_start) -> int:
    """A step number from a start/end value (see QATPassConfig); raises UsageError if the
    value needs a plan or a run length that was not given."""
    from quantkit.errors import UsageError

    if value == "plan":
        if plan_start is None:
            raise UsageError(f"QAT '{key}: plan' needs a plan: quantkit.qat.prepare(model, recipe, plan=...)")
        return int(plan_start)
    if isinstance(value, float):
        if total_steps is None:
            raise UsageError(f"QAT '{key}: {value}' is a fraction of the run; pass plan= or total_steps= to "
                             "quantkit.qat.prepare")
        return int(round(value * total_steps))
    return int(value)


def apply(model: nn.Module, cfg: QATPassConfig, progress: bool = True, scope: str = "") -> list[str]:
    """CLI/compress path: prepare and convert at once (no training), see the module docstring."""
    from quantkit.qat.convert import convert_module, qat_linear_for
    from quantkit.passes.targets import replace_module, select_linears
    from quantkit.progress import progress_bar

    chosen = select_linears(model, cfg.targets, cfg.ignore, scope)
    for name, linear in progress_bar(chosen, desc=f"qat-{cfg.grid}", disable=not progress):
        replace_module(model, name, convert_module(qat_linear_for(linear, cfg, start=0, end=None)))
    return [n for n, _ in chosen]
