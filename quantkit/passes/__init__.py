"""The pass registry: an explicit table, so an import error in a pass is never hidden.

Each entry maps a recipe ``pass:`` name to its config dataclass and apply function
``apply(model, config, progress) -> list[str]`` (names of the modules it rewrote).
To add a pass: write ``passes/<name>.py`` with a frozen config dataclass and ``apply``,
then add one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from quantkit.passes import ptq_lut4


@dataclass(frozen=True)
class PassSpec:
    name: str
    config_cls: type
    apply: Callable
    summary: str


PASSES: dict[str, PassSpec] = {
    "nf4": PassSpec("nf4", ptq_lut4.Lut4PassConfig, partial(ptq_lut4.apply, quant_type="nf4"),
                    "4-bit NormalFloat PTQ, bitsandbytes layout"),
    "fp4": PassSpec("fp4", ptq_lut4.Lut4PassConfig, partial(ptq_lut4.apply, quant_type="fp4"),
                    "4-bit float (e2m1) PTQ, bitsandbytes layout"),
}
