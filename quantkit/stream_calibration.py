"""A calibrated pass under streaming compress: activations carried block to block.

quantkit/streaming.py compresses one unit (decoder block, or a module around the blocks)
at a time. A calibrated pass with a ``stream`` driver (passes/__init__.py, e.g. BitStack)
runs inside that loop through ``CalibratedStream``:

* ``start``: the calibration windows are embedded once (the units before the first block
  are read, the model's forward is stopped at the first block: models/block_inputs.py);
  when resuming, the inputs of the next block are read back from the carry file instead;
* ``block``: the pass's driver calibrates on the block's inputs, compresses the block and
  returns the next block's inputs plus a JSON-able record (kept in the journal entry);
* ``save_carry``: those inputs go to ``carry/NNNNN.safetensors`` (temp + fsync + rename)
  *before* the journal names the block, and the previous carry file is deleted only after
  the journal does, so after any crash the last journaled block's carry exists;
* ``finalize``: after the last block, the driver turns all records into module-spec
  updates (BitStack: the model-wide block order), applied before the artifact is assembled.

Peak memory adds the carried activations, windows × tokens × hidden × 4 bytes (e.g. 16 ×
512 × 4096 fp32 = 134 MB), to the largest block.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from quantkit.errors import UsageError
from quantkit.io import shards
from quantkit.models.block_inputs import BlockInputs, capture
from quantkit.models.streaming import StreamPlan, materialize, release
from quantkit.passes import PASSES
from quantkit.passes.targets import select_linears
from quantkit.recipe import Recipe

CARRY_DIR = "carry"


def _calibrated(recipe: Recipe) -> list[int]:
    return [i for i, e in enumerate(recipe.passes) if PASSES[e.name].calibrated]


def refusal(plan: StreamPlan, recipe: Recipe) -> Optional[str]:
    """None if ``recipe`` can run block by block on ``plan``, else a sentence saying why not."""
    calibrated = _calibrated(recipe)
    if not calibrated:
        return None
    if len(calibrated) > 1:
        return "the recipe has more than one calibrated pass (block by block runs one)"
    entry = recipe.passes[calibrated[0]]
    spec = PASSES[entry.name]
    if spec.stream is None:
        return f"pass {entry.name} needs the whole model: {spec.whole_model or 'it has no block-by-block driver'}"
    reason = spec.stream.refusal(entry.config)
    if reason:
        return reason
    blocks = tuple(u.name + "." for u in plan.units if u.is_block)
    outside = [n for n, _ in select_linears(plan.model, entry.config.targets, entry.config.ignore)
               if not n.startswith(blocks)]
    if outside:
        return f"pass {entry.name} targets {outside[0]}, outside the decoder blocks"
    return None


class CalibratedStream:
    """The one calibrated pass of a recipe, run block by block (see the module docstring);
    construct it only for a recipe ``refusal`` accepts."""

    def __init__(self, plan: StreamPlan, recipe: Recipe, calib_text: Optional[str], tokenizer=None):
        from quantkit.calibration import default_text_name
        from quantkit.models.text import default_text

        self.pass_index = _calibrated(recipe)[0]
        entry = recipe.passes[self.pass_index]
        self.name = entry.name
        self.driver = PASSES[entry.name].stream(entry.config)
        # the user's text, else the shipped text the pass names (as CalibSource.for_config)
        self.text = calib_text if calib_text is not None else default_text(default_text_name(entry.config))
        self.inputs: Optional[BlockInputs] = None
        self.tokenizer = tokenizer  # None: the source folder's

    def fingerprint(self) -> dict:
        """What a resumed run must share beyond model and recipe: the calibration text."""
        return {"calib_text_sha256": hashlib.sha256(self.text.encode("utf-8")).hexdigest()}

    def start(self, plan: StreamPlan, pdir: Path, done: list, allow_nonfinite: bool,
              status: Callable[[str], None]) -> list:
        """Embed the calibration windows; when ``done`` holds blocks, continue from the last
        one's carry file. Returns ``done``, cut back to before the first block if that file
        is missing or damaged (the earlier carries are gone, so the blocks are redone)."""
        from quantkit.calibration import CalibSource
        from quantkit.models.loading import load_source_tokenizer

        tokenizer = self.tokenizer if self.tokenizer is not None else load_source_tokenizer(plan.source)
        if tokenizer is None:
            raise UsageError(missing_tokenizer_message(self.name, plan.source.path))
        ids = self.driver.windows(CalibSource(tokenizer, self.text))
        first = next(i for i, u in enumerate(plan.units) if u.is_block)
        before = plan.units[:first]
        try:
            for unit in before:
                materialize(plan, unit, allow_nonfinite)
            self.inputs = capture(plan.model, plan.model.get_submodule(plan.units[first].name), ids)
        finally:
            for unit in before:
                release(plan, unit)
        carried = [i for i, e in enumerate(done) if "carry" in e]
        if carried:
            entry = done[carried[-1]]
            x = self._read_carry(pdir, entry["carry"])
            if x is None:
                status("the carried calibration activations are missing or damaged; redoing the decoder blocks")
                return done[:first]
            self.inputs.x = x
        return done

    @staticmethod
    def _read_carry(pdir: Path, carry: dict) -> Optional[torch.Tensor]:
        from safetensors.torch import load_file

        path = pdir / carry["file"]
        if not path.is_file() or path.stat().st_size != carry["bytes"] or shards.sha256_file(path) != carry["sha256"]:
            return None
        return load_file(str(path))["x"]

    def block(self, plan: StreamPlan, unit) -> dict:
        """Run the pass on block ``unit`` (materialized); advances the carried inputs."""
        x, record = self.driver.block(plan.model, unit.name, self.inputs)
        self.inputs.x = x
        return record

    def save_carry(self, pdir: Path, index: int) -> dict:
        """Write the inputs of the block after ``index``; returns the journal's record of the file."""
        (pdir / CARRY_DIR).mkdir(exist_ok=True)
        name = f"{CARRY_DIR}/{index:05d}.safetensors"
        tmp = pdir / (name + ".tmp")
        digest = shards.write_safetensors(tmp, [shards.entry_from_tensor("x", self.inputs.x.contiguous())],
                                          {"quantkit.carry_after": str(index)})
        os.replace(tmp, pdir / name)
        shards.fsync_dir(pdir / CARRY_DIR)
        return {"file": name, "bytes": (pdir / name).stat().st_size, "sha256": digest}

    @staticmethod
    def drop_older_carries(pdir: Path, keep: dict) -> None:
        """Delete carry files other than ``keep`` (call after the journal names ``keep``)."""
        for path in (pdir / CARRY_DIR).glob("*.safetensors*"):
            if path.name != Path(keep["file"]).name:
                path.unlink(missing_ok=True)

    def finalize(self, done: list) -> list:
        """Journal entries with the driver's module-spec updates applied (copies; ``done`` is kept)."""
        updates = self.driver.finalize([e["calib"] for e in done if "calib" in e])
        out = []
        for e in done:
            modules = {n: dict(spec, **updates.get(n, {})) for n, spec in e["modules"].items()}
            out.append(dict(e, modules=modules))
        return out


def missing_tokenizer_message(pass_name: str, folder) -> str:
    """What ``quantkit compress`` says when a calibrated pass finds no tokenizer in ``folder``."""
    from quantkit.models.loading import TOKENIZER_FILES

    return (f"pass {pass_name} calibrates on text tokenized by the model's tokenizer, and {folder} has no tokenizer "
            f"files (none of {', '.join(TOKENIZER_FILES)}): copy the model's tokenizer files into {folder} or pass "
            f"--tokenizer DIR (a folder holding them); --calib-text FILE chooses the text it tokenizes (default: "
            f"the text shipped with quantkit)")
