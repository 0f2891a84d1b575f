"""Streaming compress: one unit (decoder block, or a module around the blocks) at a time,
resumable after any interruption. This is what ``quantkit compress`` runs for a
Hugging Face folder of safetensors; memory follows the largest unit, not the model.

For each unit, in state-dict order: read its tensors from the shards (models/streaming.py),
check them for NaN/Inf, apply every recipe pass to it (``apply(..., scope=unit)``), write
its tensors to ``units/NNNNN.safetensors`` in the partial folder, record it in the journal,
put it back on the meta device. When all units are done, the artifact (config, tokenizer,
weights as one file or 2 GB shards + index) is assembled from the unit files into
``<partial>/final`` and renamed to OUT.

The partial folder ``.OUT.partial`` (next to OUT) holds::

    journal.json   {"journal_version", "fingerprint": {"source", "recipe", "options"},
                    "units": [unit names], "done": [one entry per finished unit]}
    units/         one safetensors file per finished unit
    carry/         calibrated passes only: the next block's calibration inputs after the
                   last finished block (quantkit/stream_calibration.py)
    final/         the artifact being assembled (only at the very end)

Every file there is written to a temporary name, fsynced and renamed, and the journal is
updated only after its unit file is in place, so after a crash (SIGINT, SIGTERM, kill -9,
power loss) the journal lists exactly the units whose files are complete. ``--resume``
checks the fingerprint (source: config.json, index and every shard's name, size and
header; recipe; quantkit version and load dtype), re-checks each listed unit file against
its recorded size and sha256, and continues after the last good one. Units are computed
deterministically, so a resumed run writes the same bytes as an uninterrupted one. OUT
itself appears only by the final rename; an interrupted run never leaves an OUT that looks
complete. Without ``--resume``, a partial folder left by an earlier run is discarded.

QUANTKIT_TEST_UNIT_DELAY (seconds, for tests only) sleeps after each finished unit so a
test can interrupt a run of a tiny model midway.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Callable, Optional, Union

from quantkit.errors import QuantkitError, UsageError
from quantkit import heap
from quantkit.io import artifact, shards
from quantkit.models.streaming import StreamPlan, materialize, release
from quantkit.passes import PASSES
from quantkit.passes.targets import select_linears
from quantkit.progress import BlockProgress
from quantkit.recipe import Recipe
from quantkit import stream_calibration
from quantkit.stream_calibration import CalibratedStream

JOURNAL_VERSION = 1
JOURNAL = "journal.json"
UNITS_DIR = "units"
FINAL_DIR = "final"
DELAY_ENV = "QUANTKIT_TEST_UNIT_DELAY"


def partial_dir(out: Union[str, Path]) -> Path:
    """The resumable work folder of ``out``: ``.OUT.partial`` in the same parent folder."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def check_recipe_matches(model, recipe: Recipe, allow_empty: bool) -> None:
    """Fail before any work if a pass would match no module (passes run in order, and a
    module rewritten by one pass is no longer an ``nn.Linear`` for the next)."""
    claimed: set = set()
    for i, entry in enumerate(recipe.passes):
        cfg = entry.config
        if not hasattr(cfg, "targets"):
            continue
        chosen = [n for n, _ in select_linears(model, cfg.targets, cfg.ignore) if n not in claimed]
        if not chosen and not allow_empty:
            raise UsageError(f"recipe {recipe.name!r} pass {i} ({entry.name}) matched no module; check its "
                             "targets/ignore patterns (or pass allow_empty=True / --allow-empty)")
        claimed.update(chosen)


def fingerprint(plan: StreamPlan, recipe: Recipe, extra: Optional[dict] = None) -> dict:
    """What a resumed run must share with the run that wrote the partial folder."""
    from quantkit import __version__

    src = hashlib.sha256()
    folder = plan.source.path
    for name in ("config.json", shards.INDEX_NAME):
        if (folder / name).is_file():
            src.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    for f in sorted(plan.files):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = fh.read(n)  # validated before: n is capped and within the file
        src.update(f"{f.name}\0{f.stat().st_size}\0".encode() + header)
    options = {"quantkit": __version__, "artifact_version": artifact.ARTIFACT_VERSION,
               "dtype": str(plan.dtype), "units": [u.name for u in plan.units], **(extra or {})}
    return {"source": src.hexdigest(), "recipe": hashlib.sha256(recipe.to_json().encode()).hexdigest(),
            "options": hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()}


def _read_journal(pdir: Path) -> Optional[dict]:
    try:
        journal = json.loads((pdir / JOURNAL).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not (isinstance(journal, dict) and journal.get("journal_version") == JOURNAL_VERSION
            and isinstance(journal.get("fingerprint"), dict) and isinstance(journal.get("done"), list)):
        return None
    return journal


def _verified_done(pdir: Path, journal: dict, status: Callable[[str], None]) -> list:
    """The journal's finished units whose files are intact (stops at the first damaged one)."""
    good = []
    for entry in journal.get("done", []):
        path = pdir / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or shards.sha256_file(path) != entry["sha256"]:
            status(f"the file of unit {entry['unit']} is missing or damaged; redoing from there")
            break
        good.append(entry)
    return good


def _start(pdir: Path, fp: dict, plan: StreamPlan, resume: bool, status: Callable[[str], None]) -> dict:
    """The journal to continue from: the existing one (``resume``) or a fresh one."""
    journal = None
    if pdir.exists() and resume:
        journal = _read_journal(pdir)
    if pdir.exists() and resume and journal is not None:
        differs = [k for k in ("source", "recipe", "options") if journal.get("fingerprint", {}).get(k) != fp[k]]
        if differs:
            what = {"source": "a different source model", "recipe": "a different recipe",
                    "options": "a different quantkit version, model layout or calibration text"}
            raise UsageError(f"{pdir} was started from {' and '.join(what[k] for k in differs)}; --resume needs the "
                             f"same MODEL and RECIPE (run without --resume to start over)")
        journal["done"] = _verified_done(pdir, journal, status)
        status(f"resuming: {len(journal['done'])} of {len(plan.units)} units already done")
        return journal
    if pdir.exists():
        status(f"discarding {pdir} left by an earlier run" + (" (its journal is unreadable)" if resume else
                                                               " (use --resume to continue it instead)"))
        shutil.rmtree(pdir)
    elif resume:
        status(f"nothing to resume ({pdir} does not exist); starting from the beginning")
    (pdir / UNITS_DIR).mkdir(parents=True)
    journal = {"journal_version": JOURNAL_VERSION, "fingerprint": fp, "source": plan.source.display_name,
               "units": [u.name for u in plan.units], "done": []}
    shards.write_json(pdir / JOURNAL, journal)
    artifact.fsync_dir(pdir.parent)
    return journal


def _unit_state(plan: StreamPlan, unit, loaded: dict, tie_kept: dict) -> tuple[dict, dict]:
    """(tensors to store, {dropped key: kept key}) of a processed unit, deduplicated exactly as
    ``artifact.save`` deduplicates a whole model: a tensor aliasing an earlier one (here or,
    for a tied weight left untouched by the passes, in an earlier unit) is stored once."""
    module = plan.model.get_submodule(unit.name)
    state, tied, seen = {}, {}, {}
    for k, t in module.state_dict(prefix=unit.name + ".").items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            tied[k] = seen[key]
            continue
        gid = plan.tie_group.get(k)
        # still the very tensor read from the checkpoint (``loaded`` keeps it alive, so an
        # address cannot have been reused): no pass rewrote it, the tie holds as in memory
        if gid is not None and t.numel() and k in loaded and (
                t.untyped_storage().data_ptr() == loaded[k].untyped_storage().data_ptr()):
            if str(gid) in tie_kept:
                tied[k] = tie_kept[str(gid)]
                continue
            tie_kept[str(gid)] = k
        if key is not None:
            seen[key] = k
        state[k] = t.detach().contiguous().cpu()
    return state, tied


def _process_unit(plan: StreamPlan, recipe: Recipe, index: int, pdir: Path, tie_kept: dict,
                  allow_nonfinite: bool, calibrated: Optional[CalibratedStream]) -> dict:
    """Materialize, compress, write one unit; returns its journal entry."""
    from quantkit.nn import PACKED_MODULES

    unit = plan.units[index]
    loaded = materialize(plan, unit, allow_nonfinite)
    record = None
    for i, entry in enumerate(recipe.passes):
        if calibrated is not None and i == calibrated.pass_index:
            if unit.is_block:  # (it targets nothing outside the blocks: stream_calibration.refusal)
                record = calibrated.block(plan, unit)
            continue
        PASSES[entry.name].apply(plan.model, entry.config, progress=False, scope=unit.name)
    new_kept = dict(tie_kept)
    state, tied = _unit_state(plan, unit, loaded, new_kept)
    del loaded
    kinds = tuple(PACKED_MODULES.values())
    modules = {n: m.spec() for n, m in plan.model.get_submodule(unit.name).named_modules(prefix=unit.name)
               if isinstance(m, kinds)}
    name = f"{UNITS_DIR}/{index:05d}.safetensors"
    tmp = pdir / (name + ".tmp")
    digest = shards.write_safetensors(tmp, [shards.entry_from_tensor(k, t) for k, t in state.items()],
                                      {"quantkit.unit": unit.name})
    os.replace(tmp, pdir / name)
    shards.fsync_dir(pdir / UNITS_DIR)  # the rename is durable before the journal names the file
    keys = list(state)  # state-dict order: the order shards are planned in
    del state
    release(plan, unit)
    done = {"unit": unit.name, "file": name, "bytes": (pdir / name).stat().st_size, "sha256": digest,
            "keys": keys, "modules": modules, "tied": tied,
            "tie_kept": {g: k for g, k in new_kept.items() if g not in tie_kept}}
    if record is not None:
        done["calib"] = record
        done["carry"] = calibrated.save_carry(pdir, index)  # on disk before the journal names the block
    heap.return_freed_memory()  # the unit's memory is all free now: its pages go back too
    return done


def _assemble(plan: StreamPlan, recipe: Recipe, pdir: Path, journal: dict, max_shard_bytes: int,
              tokenizer=None) -> Path:
    """Write the complete artifact into ``pdir/final`` from the unit files."""
    from quantkit.models.loading import load_source_tokenizer, quiet_transformers

    final = pdir / FINAL_DIR
    if final.exists():
        shutil.rmtree(final)
    final.mkdir()
    artifact.save_config(plan.config, final)
    source = plan.source.path
    with quiet_transformers():
        gen = plan.model.generation_config
        if (source / "generation_config.json").is_file():
            from transformers import GenerationConfig
            try:
                gen = GenerationConfig.from_pretrained(source, local_files_only=True)
            except Exception:  # noqa: BLE001 -- as from_pretrained: a bad generation config is not fatal
                pass
        if gen is not None:
            try:
                gen.save_pretrained(final)
            except Exception:  # noqa: BLE001 -- same rule as artifact.save
                pass
    tokenizer = tokenizer if tokenizer is not None else load_source_tokenizer(plan.source)
    if tokenizer is not None:
        artifact.save_tokenizer(tokenizer, final)
    entries, modules, tied = [], {}, {}
    for entry in journal["done"]:
        by_name = {e.name: e for e in shards.entries_from_file(pdir / entry["file"])}
        entries += [by_name[k] for k in entry["keys"]]
        modules.update(entry["modules"])
        tied.update(entry["tied"])
    metadata = artifact.artifact_metadata(recipe.to_json(), modules, tied)
    artifact.write_weights(final, entries, metadata, max_shard_bytes)
    artifact._fsync_tree(final)
    return final


def compress_streaming(plan: StreamPlan, recipe: Recipe, out: Union[str, Path], *, overwrite: bool = False,
                       resume: bool = False, allow_empty: bool = False, allow_nonfinite: bool = False,
                       progress: bool = True, max_shard_bytes: int = shards.DEFAULT_SHARD_BYTES,
                       status: Optional[Callable[[str], None]] = None, calib_text: Optional[str] = None,
                       tokenizer=None) -> Path:
    """Compress ``plan``'s model with ``recipe`` unit by unit into the artifact folder ``out``.

    A calibrated pass with a block-by-block driver (BitStack, order "proxy") runs on
    activations carried from block to block (quantkit/stream_calibration.py), calibrated on
    ``calib_text`` (default: the shipped excerpt). ``tokenizer`` (default: the source
    folder's) tokenizes it and is saved with the artifact.

    Raises UsageError if OUT exists (unless ``overwrite``), a pass matches nothing (unless
    ``allow_empty``), a calibrated pass cannot run block by block
    (``stream_calibration.refusal``), or ``resume`` finds a partial folder
    started from another source, recipe or calibration text; QuantkitError for NaN/Inf weights (unless
    ``allow_nonfinite``). After an interruption (or an OSError such as a full disk) the
    partial folder stays for ``resume``; after a QuantkitError (bad input) it is removed.
    OUT is never touched until the artifact is complete.
    """
    status = status or (lambda msg: None)
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"output {out} already exists; pass --overwrite to replace it")
    reason = stream_calibration.refusal(plan, recipe)
    if reason:
        raise UsageError(f"cannot compress block by block: {reason}")
    calibrated = CalibratedStream(plan, recipe, calib_text, tokenizer) if any(
        PASSES[e.name].calibrated for e in recipe.passes) else None
    check_recipe_matches(plan.model, recipe, allow_empty)
    pdir = partial_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    journal = _start(pdir, fingerprint(plan, recipe, calibrated.fingerprint() if calibrated else None), plan,
                     resume, status)
    done = journal["done"]
    if calibrated is not None:
        status(f"embedding the calibration windows of pass {calibrated.name}")
        del done[len(calibrated.start(plan, pdir, done, allow_nonfinite, status)):]
    tie_kept: dict = {}
    for entry in done:
        tie_kept.update(entry["tie_kept"])
    for stale in (pdir / UNITS_DIR).glob("*.tmp"):
        stale.unlink()
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    bar = BlockProgress(len(plan.units), len(done), desc="compress", enabled=progress)
    try:
        for index in range(len(done), len(plan.units)):
            unit = plan.units[index]
            entry = _process_unit(plan, recipe, index, pdir, tie_kept, allow_nonfinite, calibrated)
            tie_kept.update(entry["tie_kept"])
            done.append(entry)
            shards.write_json(pdir / JOURNAL, journal)
            if "carry" in entry:
                calibrated.drop_older_carries(pdir, entry["carry"])
            bar.update(unit.name)
            if delay:
                time.sleep(delay)
    except BaseException as e:
        bar.close()
        if done and not isinstance(e, QuantkitError):
            # interrupted, or an environment failure (disk full, ...): worth resuming
            status(f"{len(done)} of {len(plan.units)} units are saved in {pdir}; rerun with --resume to continue")
        else:
            # bad input (NaN weights, a corrupt shard): the same run cannot succeed, leave nothing behind
            shutil.rmtree(pdir, ignore_errors=True)
        raise
    bar.close()
    if calibrated is not None:
        status(f"finalizing pass {calibrated.name}")
        journal = dict(journal, done=calibrated.finalize(done))
    status(f"assembling {out}")
    if out.exists() and not overwrite:
        raise UsageError(f"output {out} appeared while compressing; pass --overwrite to replace it")
    final = _assemble(plan, recipe, pdir, journal, max_shard_bytes, tokenizer)
    artifact.replace_dir(final, out)
    shutil.rmtree(pdir, ignore_errors=True)
    return out


def compress_to_dir(model: Union[str, Path], recipe: Union[Recipe, str, Path, dict], out: Union[str, Path], *,
                    overwrite: bool = False, resume: bool = False, allow_empty: bool = False,
                    allow_nonfinite: bool = False, progress: bool = True,
                    max_shard_bytes: int = shards.DEFAULT_SHARD_BYTES,
                    status: Optional[Callable[[str], None]] = None, calib_text: Optional[str] = None,
                    tokenizer=None) -> Path:
    """Compress ``model`` (anything ``quantkit.load_model`` accepts) into the artifact folder ``out``.

    tokenizer: a tokenizer to calibrate with and save, instead of the model's own (for a
    folder without tokenizer files: ``quantkit compress --tokenizer DIR``).

    What ``quantkit compress`` runs: a Hugging Face folder of safetensors is compressed block
    by block (``compress_streaming``; ``resume`` continues an interrupted run); a .gguf file,
    ``smollm2-135m``, an artifact, or a folder whose tensor names transformers converts on
    load is loaded whole, compressed and saved (``resume`` is refused for those).
    """
    from quantkit.api import compress, load_model
    from quantkit.models.loading import resolve_model_source
    from quantkit.models.streaming import plan_streaming
    from quantkit.recipe import load_recipe

    from quantkit.distributed import barrier, data_parallel

    status = status or (lambda msg: None)
    recipe = load_recipe(recipe)
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"output {out} already exists; pass --overwrite to replace it")
    rank, world = data_parallel()
    if world > 1:
        # several ranks (torchrun): they only help a pass that trains data-parallel; the
        # model is loaded whole on every rank and rank 0 alone writes OUT
        if not any(PASSES[e.name].data_parallel for e in recipe.passes):
            raise UsageError(f"{world} torch.distributed ranks, but recipe {recipe.name!r} has no pass that trains "
                             f"with them (dbllm does); run quantkit compress without torchrun")
        if resume:
            raise UsageError("--resume is for block-by-block compress, which does not run under torchrun")
        status(f"rank {rank} of {world}: loading {model} whole (data-parallel training)")
        loaded = compress(load_model(model), recipe, inplace=True, progress=progress and rank == 0,
                          allow_empty=allow_empty, allow_nonfinite=allow_nonfinite, calib_text=calib_text,
                          tokenizer=tokenizer)
        if rank == 0:
            artifact.save(loaded, out, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
        barrier()  # OUT is complete for every rank once this returns
        return out
    source = resolve_model_source(str(model))
    plan = plan_streaming(source) if source.kind == "hf-folder" else None
    if plan is not None and not isinstance(plan, str):
        plan = stream_calibration.refusal(plan, recipe) or plan
    if isinstance(plan, str):
        status(f"loading {model} whole: {plan}")
        plan = None
    passes = ", ".join(p.name for p in recipe.passes)
    if plan is not None:
        status(f"compressing {model} block by block with recipe {recipe.name!r} ({passes})")
        return compress_streaming(plan, recipe, out, overwrite=overwrite, resume=resume, allow_empty=allow_empty,
                                  allow_nonfinite=allow_nonfinite, progress=progress,
                                  max_shard_bytes=max_shard_bytes, status=status, calib_text=calib_text,
                                  tokenizer=tokenizer)
    if resume:
        raise UsageError(f"--resume needs a model folder that is compressed block by block; {model} is loaded "
                         f"whole")
    status(f"loading {model}")
    loaded = load_model(model)
    status(f"applying recipe {recipe.name!r} ({passes})")
    loaded = compress(loaded, recipe, inplace=True, progress=progress, allow_empty=allow_empty,
                      allow_nonfinite=allow_nonfinite, calib_text=calib_text, tokenizer=tokenizer)
    status(f"writing {out}")
    return artifact.save(loaded, out, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
