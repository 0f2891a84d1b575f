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
token windows from ``--calib-text``, else the shipped text the config's ``default_calib_text``
names, else the 120 KB excerpt; ``CalibSource.for_config``) on the whole, full-precision
model. A calibrated pass that can also run one decoder block at a time gives a ``stream``
class (see ``BitStackStream``); streaming compress (quantkit/streaming.py) then drives it:
  1. ``stream.refusal(config)``: None, or why this config needs the whole model;
  2. ``handler = stream(config)``; ``handler.windows(calib)``: the token windows; they are
     embedded once (models/block_inputs.py) into the first block's inputs;
  3. per block, in recipe order with the other passes: ``handler.block(model, block_name,
     inputs) -> (next inputs, record)`` calibrates on the block's inputs, compresses the
     block in place and returns the next block's inputs and a JSON-able record (kept in
     the resume journal; the carried inputs are saved next to it);
  4. ``handler.finalize(records) -> {module name: spec fields}`` after the last block (e.g.
     BitStack's model-wide block order), applied to the artifact's module metadata.
A calibrated pass without ``stream`` (DB-LLM: end-to-end distillation from the teacher's
logits) makes ``quantkit compress`` load the model whole, saying why (``whole_model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

from quantkit.passes import bitstack, dbllm, embeddings, ptq_lut4, qat


@dataclass(frozen=True)
class PassSpec:
    name: str
    config_cls: type
    apply: Callable
    summary: str
    calibrated: bool = False  # needs activations (see the life cycle above)
    stream: Optional[type] = None  # block-by-block driver of a calibrated pass (see above)
    whole_model: str = ""  # why a calibrated pass without ``stream`` needs the whole model
    data_parallel: bool = False  # trains with its batches split across torch.distributed ranks
    # a pass that may find nothing to do without that being a recipe mistake: the embeddings
    # pass of the shipped nf4/fp4 recipes on a model without token embeddings (a plain MLP)
    may_match_nothing: bool = False


PASSES: dict[str, PassSpec] = {
    "nf4": PassSpec("nf4", ptq_lut4.Lut4PassConfig, partial(ptq_lut4.apply, quant_type="nf4"),
                    "4-bit NormalFloat PTQ, bitsandbytes layout"),
    "fp4": PassSpec("fp4", ptq_lut4.Lut4PassConfig, partial(ptq_lut4.apply, quant_type="fp4"),
                    "4-bit float (e2m1) PTQ, bitsandbytes layout"),
    "embeddings": PassSpec("embeddings", embeddings.EmbeddingsPassConfig, embeddings.apply,
                           "token embedding and output head stored int8 / nf4 / fp4 / 16-bit (tied: once)",
                           may_match_nothing=True),
    "qat": PassSpec("qat", qat.QATPassConfig, qat.apply,
                    "quantization-aware training (quantkit.qat); compress = round-to-nearest, no training"),
    "bitstack": PassSpec("bitstack", bitstack.BitStackPassConfig, bitstack.apply,
                         "BitStack residual blocks: one artifact, loaded to any memory budget", calibrated=True,
                         stream=bitstack.BitStackStream),
    "dbllm": PassSpec("dbllm", dbllm.DbllmPassConfig, dbllm.apply,
                      "DB-LLM 2-bit dual binarization + distillation", calibrated=True,
                      whole_model="it distils the whole model end to end from the teacher's logits",
                      data_parallel=True),
}
