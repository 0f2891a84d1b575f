"""quantkit's artifact: a folder with config.json, tokenizer files and the weights, either
``model.safetensors`` or (larger than one shard, 2 GB by default) shards
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.

Saving writes everything into a temporary sibling folder, fsyncs, then renames it to the
destination, so an interrupted save never leaves a folder that looks complete.

The safetensors header metadata of every shard (all values are strings) carries the same:
    quantkit.format_version  artifact layout version (this library writes ARTIFACT_VERSION)
    quantkit.version         library version that wrote it
    quantkit.recipe          the recipe as JSON
    quantkit.modules         JSON {module name: spec} for every packed module (see quantkit.nn)
    quantkit.tied            JSON {dropped key: kept key} for weights stored once
Loading builds the model skeleton with parameters on ``meta``, swaps in empty packed
modules from ``quantkit.modules`` (never by guessing from tensor names), then loads the
tensors with ``assign=True``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from quantkit.errors import CheckpointError, FormatError, UsageError
from quantkit.io import shards
from quantkit.io.shards import DEFAULT_SHARD_BYTES, INDEX_NAME, WEIGHTS_NAME
from quantkit.nn import EMBEDDINGS, PACKED_MODULES, TIED_HEAD, bind_tied_heads
from quantkit.passes.targets import replace_module

ARTIFACT_VERSION = 1


def _packed_modules(model: nn.Module) -> dict[str, nn.Module]:
    kinds = tuple(PACKED_MODULES.values())
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier one (tied embeddings); safetensors refuses them."""
    seen: dict[tuple, str] = {}
    out, tied = {}, {}
    for k, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            tied[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = t.detach().contiguous().cpu()
    return out, tied


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


fsync_dir = shards.fsync_dir


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM for the few syscalls of a rename swap (delivered right after)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename the complete folder ``tmp`` to ``out_dir``, replacing an existing one."""
    with signals_deferred():
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            fsync_dir(out_dir.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
            fsync_dir(out_dir.parent)


@contextlib.contextmanager
def atomic_output_dir(out_dir: Union[str, Path], overwrite: bool = False):
    """Yield a temporary folder that becomes ``out_dir`` only if the block succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UsageError(f"output {out_dir} already exists; pass --overwrite (overwrite=True) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def artifact_metadata(recipe_json: str, modules: dict, tied: dict) -> dict:
    """The safetensors header metadata every shard of an artifact carries."""
    from quantkit import __version__

    return {
        "format": "pt",
        "quantkit.format_version": str(ARTIFACT_VERSION),
        "quantkit.version": __version__,
        "quantkit.recipe": recipe_json,
        "quantkit.modules": json.dumps(modules),
        "quantkit.tied": json.dumps(tied),
    }


def artifact_state_and_metadata(model: nn.Module) -> tuple[dict, dict]:
    """(state dict with tied tensors stored once, header metadata) of ``model`` as an artifact
    stores them; shared by ``save`` and transformers' ``save_pretrained`` (quantkit/integrations)."""
    recipe = getattr(model, "_quantkit_recipe", None)
    if recipe is not None:
        recipe_json = recipe.to_json()
    else:  # a model loaded from an artifact carries the recipe it was made with as a dict
        loaded = getattr(model, "_quantkit_recipe_dict", None)
        recipe_json = json.dumps(loaded) if loaded is not None else "null"
    state, tied = _dedupe_shared(model.state_dict())
    modules = {n: m.spec() for n, m in _packed_modules(model).items()}
    return state, artifact_metadata(recipe_json, modules, tied)


def write_weights(folder: Path, entries: list, metadata: dict, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list:
    """The weights part of an artifact: one file, or shards + index (see quantkit.io.shards)."""
    return shards.write_sharded(folder, entries, metadata, max_shard_bytes,
                                index_metadata={"quantkit.format_version": str(ARTIFACT_VERSION)})


QUANT_METHOD = "quantkit"


def quantization_config_entry() -> dict:
    """config.json's ``quantization_config`` of an artifact: transformers loads the folder
    through quantkit's quantizer when quantkit is imported (quantkit/integrations)."""
    return {"quant_method": QUANT_METHOD, "format_version": ARTIFACT_VERSION}


def save_config(config, folder: Path) -> None:
    """config.json with ``quantization_config`` = ``quantization_config_entry()``. A model read
    from a GGUF carries transformers' GGUF marker instead, which is replaced: the weights we
    write are not GGUF-quantized, and another quantization_config would mislead loaders."""
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = str(getattr(method, "value", method)) if method is not None else None
    if qc is not None and method not in ("gguf", QUANT_METHOD):
        raise FormatError(f"the model's config already has a quantization_config ({method}); quantkit compresses "
                          f"full-precision models only")
    config = copy.deepcopy(config)
    config.quantization_config = quantization_config_entry()
    config.save_pretrained(folder)


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer's files, with ``tokenizer.json`` written compact (no indentation): the
    same JSON transformers and tokenizers read, 43 % of the pretty-printed size for
    Gemma-3's 262k-token vocabulary (14.4 MB instead of 33.4 MB)."""
    tokenizer.save_pretrained(folder)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    path = Path(folder) / "tokenizer.json"
    if backend is not None and path.is_file():
        backend.save(str(path), pretty=False)


def save(model: nn.Module, out_dir: Union[str, Path], overwrite: bool = False, tokenizer=None,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``model`` (a transformers model, possibly compressed) to ``out_dir``.

    The recipe recorded by ``quantkit.compress`` and the tokenizer it loaded (if any) are
    saved too. Weights larger than ``max_shard_bytes`` are split into shards. Returns the
    output path.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise UsageError("quantkit.save needs a transformers model (one with a .config); "
                         f"got {type(model).__name__}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "_quantkit_tokenizer", None)
    state, metadata = artifact_state_and_metadata(model)
    entries = [shards.entry_from_tensor(k, t) for k, t in state.items()]
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_config(config, tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            with contextlib.suppress(Exception):
                gen.save_pretrained(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        write_weights(tmp, entries, metadata, max_shard_bytes)
    return Path(out_dir)


def weight_files(out_dir: Union[str, Path]) -> list[Path]:
    """The artifact's safetensors files: ``model.safetensors``, or the shards of its index."""
    folder = Path(out_dir)
    if (folder / INDEX_NAME).is_file():
        return shards.read_index(folder)[1]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    raise CheckpointError(f"{out_dir} is not a quantkit artifact: {WEIGHTS_NAME} (or {INDEX_NAME}) is missing")


def _check_version(path: Path, meta: dict) -> None:
    if "quantkit.format_version" not in meta:
        raise CheckpointError(f"{path} has no quantkit metadata (not written by quantkit.save)")
    raw = meta["quantkit.format_version"]
    try:
        version = int(raw)
    except ValueError:
        raise CheckpointError(f"{path}: bad quantkit.format_version {raw[:40]!r}") from None
    if version > ARTIFACT_VERSION:
        raise CheckpointError(f"{path} has artifact format version {version}, newer than this quantkit "
                              f"reads ({ARTIFACT_VERSION}); upgrade quantkit")
    if version < 1:
        raise CheckpointError(f"{path}: bad quantkit.format_version {version}")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _parse_metadata(path: Path, meta: dict, tensors: dict) -> tuple[dict, dict, Optional[dict]]:
    """quantkit.modules / .tied / .recipe, checked for the types every reader relies on."""
    try:
        modules = json.loads(meta.get("quantkit.modules", "{}"))
        tied = json.loads(meta.get("quantkit.tied", "{}"))
        recipe = json.loads(meta.get("quantkit.recipe", "null"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt quantkit metadata: {e}") from None
    if not isinstance(modules, dict):
        raise CheckpointError(f"{path}: corrupt quantkit metadata: quantkit.modules is not a JSON object")
    for name, spec in modules.items():
        bad = None
        if not name or not isinstance(spec, dict):
            bad = "is not an object" if name else "has an empty name"
        elif not isinstance(spec.get("format"), str):
            bad = "has no format name"
        elif not (_is_count(spec.get("in_features")) and _is_count(spec.get("out_features"))):
            bad = "has no positive integer in_features/out_features"
        elif not (isinstance(spec.get("bits_per_weight"), (int, float)) and not isinstance(spec["bits_per_weight"], bool)
                  and math.isfinite(spec["bits_per_weight"])):
            bad = "has no numeric bits_per_weight"
        elif spec["format"] == TIED_HEAD:
            target = modules.get(spec.get("tied_to"))
            if not (isinstance(target, dict) and target.get("format") in EMBEDDINGS):
                bad = f"is tied to {str(spec.get('tied_to'))[:200]!r}, which is not a packed embedding in the file"
        elif not any(k == name + ".weight" or k.startswith(name + ".weight.") for k in tensors):
            bad = "has no tensors in the file"
        if bad:
            raise CheckpointError(f"{path}: corrupt quantkit metadata: module {name[:200]!r} {bad}")
    if not (isinstance(tied, dict) and all(isinstance(k, str) and isinstance(v, str) and v in tensors
                                           and k not in tensors for k, v in tied.items())):
        raise CheckpointError(f"{path}: corrupt quantkit metadata: quantkit.tied must map names not stored to "
                              f"stored tensors")
    if recipe is not None and not isinstance(recipe, dict):
        raise CheckpointError(f"{path}: corrupt quantkit metadata: quantkit.recipe is not a JSON object")
    return modules, tied, recipe


def read_metadata(out_dir: Union[str, Path]) -> dict:
    """Validated headers of an artifact (no tensor data read).

    Returns {"path": the single file or the index, "files": [shard paths], "tensors": {name:
    header entry}, "tensor_files": {name: shard path}, "modules", "tied", "recipe",
    "metadata": the quantkit header metadata}. Every shard must carry the same quantkit
    metadata and the index must list exactly the tensors the shards hold.
    """
    from quantkit.io.safetensors_check import validate_safetensors

    folder = Path(out_dir)
    files = weight_files(folder)
    sharded = (folder / INDEX_NAME).is_file()
    tensors, tensor_files, meta = {}, {}, None
    for path in files:
        header = validate_safetensors(path)
        m = header.get("__metadata__") or {}
        _check_version(path, m)
        if meta is None:
            meta = m
        elif m != meta:
            raise CheckpointError(f"{path}: quantkit metadata differs from {files[0].name}'s; the shards do not "
                                  f"belong to one artifact")
        for k, v in header.items():
            if k == "__metadata__":
                continue
            if k in tensors:
                raise CheckpointError(f"{path}: tensor {k!r} is also in {tensor_files[k].name}")
            tensors[k], tensor_files[k] = v, path
    if sharded:
        weight_map = shards.read_index(folder)[0]
        for k in sorted(set(weight_map) ^ set(tensors))[:1]:
            where = f"not in any shard" if k in weight_map else f"in {tensor_files[k].name} but not in the index"
            raise CheckpointError(f"{folder / INDEX_NAME}: tensor {k!r} is {where}")
        for k, name in weight_map.items():
            if tensor_files[k].name != name:
                raise CheckpointError(f"{folder / INDEX_NAME} puts tensor {k!r} in {name}, but it is in "
                                      f"{tensor_files[k].name}")
    path = folder / INDEX_NAME if sharded else files[0]
    modules, tied, recipe = _parse_metadata(path, meta, tensors)
    return {"path": path, "files": files, "tensors": tensors, "tensor_files": tensor_files, "modules": modules,
            "tied": tied, "recipe": recipe, "metadata": meta}


def load_tensors(info: dict, first_rows: Optional[dict] = None, keep=None) -> dict:
    """Every tensor of the artifact described by ``read_metadata``'s ``info`` (all shards).

    first_rows: {tensor name: r} reads only rows [0, r) of those tensors (dim 0), so a
    BitStack model loaded under a memory budget never reads the blocks it leaves out.
    keep: a predicate on tensor names; only those are read (default: all).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = {}
    for path in info["files"]:
        try:
            if not first_rows and keep is None:
                state.update(load_file(str(path)))
                continue
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    if keep is not None and not keep(k):
                        continue
                    state[k] = f.get_slice(k)[:first_rows[k]] if first_rows and k in first_rows else f.get_tensor(k)
        except Exception as e:
            raise CheckpointError(f"{path} cannot be read: {e}") from None
    return state


@contextlib.contextmanager
def parameters_on_meta():
    """Create parameters on the meta device (no memory, no init) while buffers stay real.

    Non-persistent buffers such as rotary ``inv_freq`` are computed in ``__init__`` and are
    not in the checkpoint, so they must be materialised normally.
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load(out_dir: Union[str, Path], device: Union[str, torch.device] = "cpu",
         memory_budget: Union[int, str, None] = None) -> nn.Module:
    """Load an artifact written by ``quantkit.save``; returns a transformers model in eval mode.

    memory_budget: bytes (int) or a size string ("950KB", "120MB", "1.5GB": SI units;
    "MiB"/"GiB" binary). For a BitStack artifact, loads as many residual blocks per layer as
    fit, in the artifact's block order (quantkit/io/bitstack_budget.py says how memory is
    counted); None loads every block. Any artifact whose model exceeds the budget is refused
    with a UsageError stating the minimum. The bytes the model holds are in
    ``model._quantkit_memory_bytes``.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir} does not exist or is not a folder")
    info = read_metadata(out_dir)
    load_plan = plan_load(out_dir, info, memory_budget)
    model = skeleton(out_dir, info, load_plan["blocks"])
    state = load_tensors(info, load_plan["first_rows"])
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in info["tied"]]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{info['path']} does not match {type(model).__name__}: "
                              f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if info["tied"]:
        model.tie_weights()
    bind_tied_heads(model)  # a packed head tied to the packed embedding reads its table
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{info['path']}: tensors not found in the file: {still_meta[:5]}")
    model.eval()
    model._quantkit_recipe_dict = info["recipe"]
    model._quantkit_memory_bytes = check_loaded_memory(model, info, load_plan)
    return model.to(device)


def fixed_bytes(model: nn.Module, info: dict) -> int:
    """Bytes the loaded model will hold outside its BitStack blocks, from a skeleton (packed
    modules already swapped in; parameters may be on meta) and the file's header dtypes:
    every parameter and buffer once (tied weights share one), the dtype the file stores
    where it stores that name, the module's own dtype otherwise (packed-module buffers,
    non-persistent buffers such as rotary inv_freq)."""
    from quantkit.io.safetensors_check import DTYPE_BITS
    from quantkit.nn.bitstack_linear import BitStackLinear

    skip = {id(t) for m in model.modules() if isinstance(m, BitStackLinear) for t in (m.signs, m.u, m.v, m.scale)
            if t is not None}
    total, seen = 0, set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        # a name the file stores tied to another counts once, tied in the skeleton or not yet
        # (transformers ties after loading when it builds the skeleton in from_pretrained)
        if id(t) in skip or id(t) in seen or name in info["tied"]:
            continue
        seen.add(id(t))
        entry = info["tensors"].get(name)
        bits = DTYPE_BITS[entry["dtype"]] if entry is not None else 8 * t.element_size()
        total += (t.numel() * bits + 7) // 8
    return total


def skeleton(out_dir: Union[str, Path], info: dict, blocks: Optional[dict] = None, meta_buffers: bool = False) -> nn.Module:
    """The artifact's model with empty packed modules swapped in and parameters on meta.

    blocks: {BitStack module: blocks to hold} (default: all stored). meta_buffers: put
    buffers on meta too (nothing allocated; for header-only questions such as inspect).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(out_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config
        raise CheckpointError(f"{out_dir}/config.json cannot be read: {e}") from None
    with (torch.device("meta") if meta_buffers else contextlib.nullcontext()), parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    swap_packed_modules(model, info, blocks)
    return model


def swap_packed_modules(model: nn.Module, info: dict, blocks: Optional[dict] = None) -> list[str]:
    """Replace every module the artifact's ``quantkit.modules`` table names with an empty
    packed module (tensors on meta) built from its spec; returns their names. Used by
    ``skeleton`` and by the transformers integration (quantkit/integrations)."""
    blocks = blocks or {}
    for name, spec in info["modules"].items():
        fmt = spec.get("format")
        if fmt not in PACKED_MODULES:
            raise FormatError(f"{info['path']}: module {name} has unknown format {fmt!r}; "
                              f"this quantkit knows {', '.join(PACKED_MODULES)}")
        try:
            model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{info['path']}: module {name} does not exist in {type(model).__name__}") from None
        if name in blocks:
            replace_module(model, name, PACKED_MODULES[fmt].from_spec(spec, device="meta", n_loaded=blocks[name]))
        else:
            replace_module(model, name, PACKED_MODULES[fmt].from_spec(spec, device="meta"))
    return list(info["modules"])


def plan_load(out_dir: Union[str, Path], info: dict, memory_budget: Union[int, str, None]) -> dict:
    """How a load under ``memory_budget`` reads the artifact: {"budget": bytes or None,
    "blocks": {BitStack module: blocks to hold}, "planned": bytes the model will hold (None
    without BitStack layers or budget), "first_rows": {tensor: rows to read} or None}."""
    from quantkit.io import bitstack_budget

    budget = bitstack_budget.parse_memory(memory_budget) if memory_budget is not None else None
    plan = budget_plan(out_dir, info)
    blocks, planned = plan.n_blocks, None
    if budget is not None and plan.block_bytes:
        blocks, planned = plan.choose(budget)
    first_rows = {f"{name}.{k}": n for name, n in blocks.items() for k in bitstack_budget.PACKED_KEYS}
    return {"budget": budget, "blocks": blocks, "planned": planned,
            "first_rows": first_rows if budget is not None else None}


def check_loaded_memory(model: nn.Module, info: dict, load_plan: dict) -> int:
    """Bytes ``model`` holds, checked against what ``plan_load`` promised and the budget."""
    from quantkit.io import bitstack_budget

    held = bitstack_budget.model_memory_bytes(model)
    planned, budget = load_plan["planned"], load_plan["budget"]
    if planned is not None and held != planned:
        raise FormatError(f"{info['path']}: the loaded model holds {held:,} bytes but the header promised "
                          f"{planned:,}; the artifact's sizes are inconsistent")
    if budget is not None and held > budget:  # only reachable without BitStack layers
        raise UsageError(f"memory budget {budget:,} bytes ({budget / 1e6:.2f} MB) is below this artifact's "
                         f"minimum of {held:,} bytes ({held / 1e6:.2f} MB); it has no BitStack layers to drop")
    return held


def budget_plan(out_dir: Union[str, Path], info: Optional[dict] = None):
    """The BitStack budget plan of an artifact (header and config only; nothing allocated)."""
    from quantkit.io import bitstack_budget

    info = info or read_metadata(out_dir)
    return bitstack_budget.make_plan(info, fixed_bytes(skeleton(out_dir, info, meta_buffers=True), info))


def load_tokenizer(folder: Union[str, Path]):
    """The tokenizer saved next to a model, or None if the folder has none."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def artifact_bytes(out_dir: Union[str, Path]) -> int:
    """Total size on disk of the files in ``out_dir``."""
    return sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())

