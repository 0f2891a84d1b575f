"""The pass registry: an explicit table, so an import error in a pass is never hidden.

Each entry maps a recipe ``pass:`` name to its config dataclass and apply function
``apply(model, config, progress, scope="") -> list[str]`` (full names of the modules it
rewrote). ``scope`` names a submodule to work inside (streaming compress passes each
decoder block's name, e.g. ``model.layers.3``, with the rest of the model still on the
meta device); selection by target/ignore patterns uses full names, so a pass must give
the same result per module whether it runs on the whole model or block by block.
To add a pass: write ``passes/<name>.py`` with a frozen config dataclass and ``apply``,
then add one line here.

Calibrated passes (DB-LLM, BitStack) set ``calibrated=True``; ``quantkit.compress`` then
calls ``apply(model, config, progress, scope="", calib=CalibSource)`` (quantkit/calibration.py:
token windows from ``--calib-text`` or the shipped excerpt) on the whole, full-precision
model, and ``quantkit compress`` loads a model whole for them. Their intended
life cycle under streaming compress (quantkit/streaming.py), one block at a time:
  1. initialize: before the first block, the calibration token ids are embedded (the
     embedding unit is materialized first anyway) into the block inputs ``x``;
  2. per block: materialize the block, run ``x`` through it with the pass's observer
     hooks (calibrate), call ``apply(model, cfg, progress, scope=block, calib=...)`` to
     compress it, then run ``x`` through the *compressed* block to get the next block's
     inputs (so errors propagate as at inference), write the block, free it;
  3. finalize: after the last block (e.g. a global bit allocation for BitStack).
The carried ``x`` must be saved next to the journal with each finished block for
``--resume`` to continue exactly. Streaming compress refuses calibrated passes until
this is implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from quantkit.passes import bitstack, dbllm, ptq_lut4, qat


@dataclass(frozen=True)
class PassSpec:
    name: str
    config_cls: type
    apply: Callable
    summary: str
    calibrated: bool = False  # needs activations (see the life cycle above)


PASSES: dict[str, PassSpec] = {
    "nf4": PassSpec("nf4", ptq_lut4.Lut4PassConfig, partial(ptq_lut4.apply, quant_type="nf4"),
                    "4-bit NormalFloat PTQ, bitsandbytes layout"),
    "fp4": PassSpec("fp4", ptq_lut4.Lut4PassConfig, partial(ptq_lut4.apply, quant_type="fp4"),
                    "4-bit float (e2m1) PTQ, bitsandbytes layout"),
    "qat": PassSpec("qat", qat.QATPassConfig, qat.apply,
                    "quantization-aware training (quantkit.qat); compress = round-to-nearest, no training"),
    "bitstack": PassSpec("bitstack", bitstack.BitStackPassConfig, bitstack.apply,
                         "BitStack residual blocks: one artifact, loaded to any memory budget", calibrated=True),
    "dbllm": PassSpec("dbllm", dbllm.DbllmPassConfig, dbllm.apply,
                      "DB-LLM 2-bit dual binarization + distillation", calibrated=True),
}
