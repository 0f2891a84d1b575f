"""quantkit's artifact: a folder with config.json, tokenizer files and model.safetensors.

Saving writes everything into a temporary sibling folder, fsyncs, then renames it to the
destination, so an interrupted save never leaves a folder that looks complete.

The safetensors header metadata (all values are strings) carries:
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
import os
import shutil
import uuid
from pathlib import Path
from typing import Union

import torch
from torch import nn

from quantkit.errors import CheckpointError, FormatError, UsageError
from quantkit.nn import PACKED_MODULES
from quantkit.passes.targets import replace_module

ARTIFACT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"


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
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(model: nn.Module, out_dir: Union[str, Path], overwrite: bool = False, tokenizer=None) -> Path:
    """Write ``model`` (a transformers model, possibly compressed) to ``out_dir``.

    The recipe recorded by ``quantkit.compress`` and the tokenizer it loaded (if any) are
    saved too. Returns the output path.
    """
    from safetensors.torch import save_file

    from quantkit import __version__

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise UsageError("quantkit.save needs a transformers model (one with a .config); "
                         f"got {type(model).__name__}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "_quantkit_tokenizer", None)
    recipe = getattr(model, "_quantkit_recipe", None)
    state, tied = _dedupe_shared(model.state_dict())
    modules = {n: m.spec() for n, m in _packed_modules(model).items()}
    metadata = {
        "format": "pt",
        "quantkit.format_version": str(ARTIFACT_VERSION),
        "quantkit.version": __version__,
        "quantkit.recipe": recipe.to_json() if recipe is not None else "null",
        "quantkit.modules": json.dumps(modules),
        "quantkit.tied": json.dumps(tied),
    }
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)) == "gguf":
        # transformers marks models read from GGUF this way; the weights we write are not
        # GGUF-quantized any more, so the entry would only mislead other loaders
        config = copy.deepcopy(config)
        del config.quantization_config
    with atomic_output_dir(out_dir, overwrite) as tmp:
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            with contextlib.suppress(Exception):
                gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS_NAME), metadata=metadata)
    return Path(out_dir)


def read_metadata(out_dir: Union[str, Path]) -> dict:
    """Validated header of an artifact: {"tensors": {...}, "metadata": {...}} (no tensor data read)."""
    from quantkit.io.safetensors_check import validate_safetensors

    path = Path(out_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{out_dir} is not a quantkit artifact: {WEIGHTS_NAME} is missing")
    header = validate_safetensors(path)
    meta = header.get("__metadata__") or {}
    if "quantkit.format_version" not in meta:
        raise CheckpointError(f"{path} has no quantkit metadata (not written by quantkit.save)")
    try:
        version = int(meta["quantkit.format_version"])
    except ValueError:
        raise CheckpointError(f"{path}: bad quantkit.format_version {meta['quantkit.format_version']!r}") from None
    if version > ARTIFACT_VERSION:
        raise CheckpointError(f"{path} has artifact format version {version}, newer than this quantkit "
                              f"reads ({ARTIFACT_VERSION}); upgrade quantkit")
    try:
        modules = json.loads(meta.get("quantkit.modules", "{}"))
        tied = json.loads(meta.get("quantkit.tied", "{}"))
        recipe = json.loads(meta.get("quantkit.recipe", "null"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt quantkit metadata: {e}") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    return {"path": path, "tensors": tensors, "modules": modules, "tied": tied, "recipe": recipe,
            "metadata": meta}


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


def load(out_dir: Union[str, Path], device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load an artifact written by ``quantkit.save``; returns a transformers model in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir} does not exist or is not a folder")
    info = read_metadata(out_dir)
    try:
        config = AutoConfig.from_pretrained(out_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config
        raise CheckpointError(f"{out_dir}/config.json cannot be read: {e}") from None
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    for name, spec in info["modules"].items():
        fmt = spec.get("format")
        if fmt not in PACKED_MODULES:
            raise FormatError(f"{info['path']}: module {name} has unknown format {fmt!r}; "
                              f"this quantkit knows {', '.join(PACKED_MODULES)}")
        try:
            model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{info['path']}: module {name} does not exist in {type(model).__name__}") from None
        replace_module(model, name, PACKED_MODULES[fmt].from_spec(spec, device="meta"))
    try:
        state = load_file(str(info["path"]))
    except Exception as e:
        raise CheckpointError(f"{info['path']} cannot be read: {e}") from None
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in info["tied"]]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{info['path']} does not match {type(model).__name__}: "
                              f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if info["tied"]:
        model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{info['path']}: tensors not found in the file: {still_meta[:5]}")
    model.eval()
    model._quantkit_recipe_dict = info["recipe"]
    return model.to(device)


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

