"""Read a sharded safetensors model one unit at a time: a decoder block, or one of the
modules around the blocks (embeddings, final norm, output head).

``plan_streaming`` builds the model skeleton from config.json with every parameter on the
meta device (no memory), finds the decoder-block list (the ``nn.ModuleList`` holding most
parameters), cuts the model into units in state-dict order, and maps every tensor the model
needs to the shard that holds it, checking names, shapes and dtypes against the headers
before anything is read. ``materialize`` then reads one unit's tensors (``safe_open``,
memory-mapped, each mapping closed right after its tensor is copied) into that unit, cast to the load dtype exactly as
``from_pretrained(dtype=...)`` would; ``release`` puts the unit back on the meta device.

Only checkpoints whose tensor names are the model's own state-dict names (what
``save_pretrained`` writes) are streamed. When names differ (transformers renames or fuses
some on load), or the config carries a ``quantization_config``, ``plan_streaming`` returns
the reason instead of a plan and the caller loads the model whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from quantkit.errors import CheckpointError, QuantkitError, UsageError
from quantkit.io.safetensors_check import validate_safetensors
from quantkit.io.shards import INDEX_NAME, ST_TO_TORCH, read_index
from quantkit.models.loading import ModelSource, _one_line, nonfinite_kind, nonfinite_message, quiet_transformers


@dataclass(frozen=True)
class Unit:
    """A piece of the model compressed and written as one: ``name`` is its module path."""

    name: str
    keys: tuple[str, ...]  # full state-dict keys of the unit in the skeleton
    is_block: bool


@dataclass
class StreamPlan:
    source: ModelSource
    config: object
    model: nn.Module                        # the skeleton: parameters on meta
    units: list[Unit]
    files: list[Path]                       # the safetensors files read
    key_source: dict[str, tuple[str, Path]]  # model key -> (checkpoint key, file)
    tie_group: dict[str, int] = field(default_factory=dict)  # model key -> id of its tied-weight group
    param_keys: frozenset = frozenset()     # keys that are parameters (checked for NaN/Inf)
    dtype: torch.dtype = torch.float32


def _checkpoint_keys(folder: Path) -> tuple[dict[str, tuple[Path, dict]], list[Path]]:
    """{checkpoint key: (file, header entry)} and the files; with an index, only its shards."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map, files = read_index(folder)
    else:
        weight_map, files = None, sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    keys: dict[str, tuple[Path, dict]] = {}
    for f in files:
        for k, v in validate_safetensors(f).items():
            if k == "__metadata__":
                continue
            if k in keys:
                raise CheckpointError(f"{f}: tensor {k!r} is also in {keys[k][0].name}; the checkpoint is ambiguous")
            keys[k] = (f, v)
    if weight_map is not None:
        for k, name in weight_map.items():
            if k not in keys or keys[k][0].name != name:
                raise CheckpointError(f"{index} puts tensor {k!r} in {name}, but {folder / name} does not hold it")
    return keys, files


def _block_list(model: nn.Module) -> Optional[str]:
    """Name of the ModuleList of decoder blocks: the one holding the most parameters."""
    best, best_n = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m):
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = name, n
    return best


def _has_own_state(m: nn.Module) -> bool:
    return any(p is not None for p in m._parameters.values()) or any(
        b is not None and n not in m._non_persistent_buffers_set for n, b in m._buffers.items())


def _units(model: nn.Module, blocks: str) -> Union[list[Unit], str]:
    """Units in state-dict order, or a reason why the model cannot be cut into units."""
    units: list[Unit] = []

    def keys_of(name: str, m: nn.Module) -> tuple:
        return tuple(m.state_dict(prefix=name + ".").keys())

    def walk(prefix: str, m: nn.Module) -> Optional[str]:
        if _has_own_state(m):
            return f"module {prefix or type(m).__name__} holds tensors of its own next to the decoder blocks"
        for child_name, child in m.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if name == blocks:
                for i, block in child.named_children():
                    units.append(Unit(f"{name}.{i}", keys_of(f"{name}.{i}", block), True))
            elif blocks.startswith(name + "."):
                reason = walk(name, child)
                if reason:
                    return reason
            else:
                keys = keys_of(name, child)
                if keys:
                    units.append(Unit(name, keys, False))
        return None

    reason = walk("", model)
    if reason:
        return reason
    flat = [k for u in units for k in u.keys]
    if flat != list(model.state_dict().keys()):
        return "its units do not cover its state dict in order"
    return units


def plan_streaming(source: ModelSource, dtype: torch.dtype = torch.float32) -> Union[StreamPlan, str]:
    """A plan to read ``source`` unit by unit, or a sentence saying why it must be loaded whole.

    Raises CheckpointError for a checkpoint that can never load: a tensor the model needs
    that no shard holds, a shape or dtype that does not fit the model, an ambiguous key.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantkit.io.artifact import parameters_on_meta

    if source.kind != "hf-folder":
        return f"{source.kind} sources are loaded whole by transformers"
    folder = source.path
    raw_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if raw_config.get("quantization_config") is not None:
        return "its config.json has a quantization_config (an already-quantized checkpoint)"
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            with parameters_on_meta():
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (QuantkitError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:
        raise UsageError(f"{folder}/config.json: transformers cannot build the model: {_one_line(e)}") from None
    model.eval()
    blocks = _block_list(model)
    if blocks is None:
        return f"{type(model).__name__} has no list of decoder blocks"
    units = _units(model, blocks)
    if isinstance(units, str):
        return f"{type(model).__name__}: {units}"

    ckpt, files = _checkpoint_keys(folder)
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    tie_group, aliases = {}, {}
    for gid, (_, names) in enumerate(groups.items()):
        if len(names) > 1:
            for n in names:
                tie_group[n], aliases[n] = gid, names
    param_keys = frozenset(n for names in groups.values() for n in names)

    skeleton_sd = model.state_dict(keep_vars=True)
    key_source, missing = {}, []
    for key, t in skeleton_sd.items():
        # a tied weight comes from the first of its names the checkpoint holds, as transformers
        # ties the head to the embedding whatever the file holds under the head's name
        src = next((a for a in aliases[key] if a in ckpt), None) if key in aliases else (
            key if key in ckpt else None)
        if src is None:
            missing.append(key)
            continue
        path, entry = ckpt[src]
        if tuple(entry["shape"]) != tuple(t.shape):
            raise CheckpointError(f"{path}: tensor {src} has shape {entry['shape']}, but {type(model).__name__} "
                                  f"(from config.json) needs {list(t.shape)}")
        st_dtype = ST_TO_TORCH.get(entry["dtype"])
        if st_dtype is None or st_dtype.is_floating_point != t.dtype.is_floating_point or (
                not t.dtype.is_floating_point and st_dtype != t.dtype):
            raise CheckpointError(f"{path}: tensor {src} has dtype {entry['dtype']}, which cannot be loaded "
                                  f"into a {str(t.dtype).removeprefix('torch.')} tensor")
        key_source[key] = (src, path)
    if missing:
        unused = [k for k in ckpt if k not in skeleton_sd]
        if unused:
            return (f"its tensor names differ from {type(model).__name__}'s (e.g. {unused[0]!r}); "
                    f"transformers converts them on load")
        raise CheckpointError(f"{folder}: tensor {missing[0]} (needed by {type(model).__name__}) is in none of "
                              f"{', '.join(p.name for p in files)}" + (f" (and {len(missing) - 1} more missing)"
                                                                    if len(missing) > 1 else ""))
    return StreamPlan(source, config, model, units, files, key_source, tie_group, param_keys, dtype)


def materialize(plan: StreamPlan, unit: Unit, allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    """Read ``unit``'s tensors into the skeleton; returns {key: tensor} of what was read (hold
    it only as long as you need to tell which tensors the passes left untouched).

    Each tensor is copied out of its shard through ``safe_open`` (memory-mapped), the mapping
    closed right after, so at most one tensor's file pages count toward RSS. Floating tensors
    are cast to ``plan.dtype``. A parameter holding NaN/Inf raises QuantkitError naming it
    and its file, unless ``allow_nonfinite``.
    """
    from safetensors import safe_open

    module = plan.model.get_submodule(unit.name)
    targets = module.state_dict(prefix=unit.name + ".", keep_vars=True)
    loaded: dict[str, torch.Tensor] = {}
    read: dict[str, torch.Tensor] = {}  # checkpoint key -> tensor (tied keys in one unit share it)
    for key in unit.keys:
        src, path = plan.key_source[key]
        if src not in read:
            try:
                # one mapping per tensor: its pages leave RSS as soon as the copy is made
                with safe_open(str(path), framework="pt") as f:
                    t = f.get_tensor(src)
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:
                raise CheckpointError(f"{path} cannot be read: {_one_line(e)}") from None
            want = targets[key].dtype
            if t.dtype != want and t.is_floating_point():
                t = t.to(want)
            if key in plan.param_keys and not allow_nonfinite:
                kind = nonfinite_kind(t)
                if kind:
                    raise QuantkitError(nonfinite_message(key, t.shape, kind, f" in {path}"))
            read[src] = t
        loaded[key] = read[src]
    read.clear()
    local = {k[len(unit.name) + 1:]: t for k, t in loaded.items()}
    module.load_state_dict(local, strict=True, assign=True)
    return loaded


def release(plan: StreamPlan, unit: Unit) -> None:
    """Move ``unit`` (possibly rewritten by passes) back to the meta device, freeing its memory."""
    plan.model.get_submodule(unit.name).to("meta")
