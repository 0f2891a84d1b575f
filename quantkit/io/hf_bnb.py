"""Export to a transformers + bitsandbytes checkpoint (``quantkit export OUT --to hf-bnb``).

quantkit's lut4 (nf4/fp4) modules already store bitsandbytes' ``Linear4bit`` state-dict
keys, byte for byte, so the export is mostly a copy:

* ``config.json``: the artifact's config plus ``quantization_config`` =
  ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=<nf4|fp4>,
  bnb_4bit_use_double_quant=<bool>, bnb_4bit_compute_dtype=float32,
  llm_int8_skip_modules=[every nn.Linear left unquantized]).to_dict()``, written by the
  config's own ``save_pretrained`` (so the form is exactly what transformers writes; a
  test compares it with a real bnb-loaded model's ``save_pretrained``).
  compute dtype float32: quantkit's ``lut4_linear`` dequantizes to fp32, accumulates in
  fp32 and casts the result to the activation dtype; bnb's ``Linear4bit`` with
  ``compute_dtype=float32`` does the same (casts x to fp32, dequantizes to fp32, matmul,
  casts back), so both run the same arithmetic for any activation dtype.
  ``llm_int8_skip_modules`` is explicit because an explicit list replaces transformers'
  default skips (output embedding, tied weights): we list exactly the Linear modules the
  recipe left in full precision, e.g. ``["lm_head"]``.
* ``model.safetensors`` (or shards + ``model.safetensors.index.json`` past 2 GB, as
  transformers writes them): every tensor of the artifact, unchanged; header metadata is
  ``{"format": "pt"}`` as transformers writes (quantkit's own keys are dropped, so DEST
  is not mistaken for a quantkit artifact). A weight quantkit stored once because it
  aliases another (``quantkit.tied``) is written back only if transformers does not tie
  it itself.
* the token embedding and output head packed by the embeddings pass (int8 / nf4 / fp4 /
  16-bit tables) are written as dense fp32 ``<name>.weight`` with their decoded values,
  since bitsandbytes has no packed embedding; a head tied to the embedding is left to
  transformers' own tying. The folder is larger than the artifact by that much.
* every other file of the artifact (tokenizer, generation_config.json, ...) is copied.

bitsandbytes reads blocksize and double-quant per tensor from each
``weight.quant_state.bitsandbytes__*`` blob, but the config can state only one quant
type / double-quant setting, so every packed module must share quant type, double quant
and blocksize; otherwise the export stops with an error naming two disagreeing modules.

bitsandbytes 0.50's native CPU ``dequantize_4bit`` decodes a layer wrongly when its blocks
span rows (in_features not a multiple of blocksize, e.g. K=576 with block 128); the
export still writes the (correct) layout but warns with ``BnbCpuLayoutWarning``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Callable, Union

from quantkit.errors import CheckpointError, FormatError, UsageError
from quantkit.io.artifact import atomic_output_dir, load_tensors, read_metadata
from quantkit.io.shards import entry_from_tensor, is_weight_file, write_sharded

BNB_COMPUTE_DTYPE = "float32"


class BnbCpuLayoutWarning(UserWarning):
    """The export is valid but bitsandbytes' CPU kernels are known to decode it wrongly."""


def _lut4_bnb_args(name: str, spec: dict) -> dict:
    """BitsAndBytesConfig arguments that describe one lut4 module (and a consistency key)."""
    return {"bnb_4bit_quant_type": spec["quant_type"],
            "bnb_4bit_use_double_quant": bool(spec["double_quant"]),
            "blocksize": int(spec["blocksize"])}  # not a config field: must just agree


# format -> (what it becomes, function(name, spec) -> config arguments)
HF_BNB_FORMATS: dict[str, tuple[str, Callable[[str, dict], dict]]] = {
    "lut4": ("nf4/fp4 as bitsandbytes Linear4bit", _lut4_bnb_args),
}


# formats of the embeddings pass (token embedding, output head): bitsandbytes holds neither
# packed, so the export writes them as dense fp32 tables (the decoded values exactly); a head
# tied to the embedding is left out (transformers ties it on load, tie_word_embeddings)
# (and an int8 head, format intk, whatever its name says: bnb has no int8 4-bit-config layer)
TABLE_FORMATS = ("intk_embedding", "lut4_embedding", "dense_embedding", "tied_head", "dense")


def _check_tables(skeleton, tables: dict, path) -> None:
    """The embeddings pass's modules must be the model's input embedding / output head."""
    from quantkit.nn import TIED_HEAD

    names = {n for n, m in skeleton.named_modules() if m is skeleton.get_input_embeddings()
             or m is skeleton.get_output_embeddings()}
    for name, spec in tables.items():
        if name not in names:
            raise FormatError(f"{path}: module {name} (format {spec['format']}) is not the model's input embedding or "
                              f"output head")
        if spec["format"] == TIED_HEAD and not getattr(skeleton.config.get_text_config(), "tie_word_embeddings",
                                                       False):
            raise FormatError(f"{path}: {name} is stored tied to {spec['tied_to']}, but config.json does not set "
                              f"tie_word_embeddings, so transformers would not tie it")


def _densify_tables(tensors: dict, tables: dict) -> None:
    """Replace each packed table's tensors by ``<name>.weight`` fp32 (its decoded values)."""
    from quantkit.nn import PACKED_MODULES, TIED_HEAD

    for name, spec in tables.items():
        own = {k: t for k, t in tensors.items() if k.startswith(name + ".")}
        for k in own:
            del tensors[k]
        if spec["format"] == TIED_HEAD:
            continue
        module = PACKED_MODULES[spec["format"]].from_spec(spec, device="cpu")
        module.load_state_dict({k[len(name) + 1:]: t for k, t in own.items()}, strict=True, assign=True)
        tensors[name + ".weight"] = module.dequantized_weight().float().contiguous()
        if module.bias is not None:
            tensors[name + ".bias"] = module.bias.detach()


def _shared_bnb_args(modules: dict) -> dict:
    """The one set of bnb arguments every packed module agrees on (FormatError if they don't)."""
    first_name, first = None, None
    for name, spec in modules.items():
        fmt = spec.get("format")
        try:
            args = HF_BNB_FORMATS[fmt][1](name, spec)
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"module {name} (format {fmt}) cannot be exported to hf-bnb: bad spec ({e})") from None
        if first is None:
            first_name, first = name, args
        elif args != first:
            diff = ", ".join(f"{k} {first[k]!r} vs {args[k]!r}" for k in first if first[k] != args.get(k))
            raise FormatError(
                f"hf-bnb needs one quantization setting for the whole model (transformers' quantization_config "
                f"holds a single quant type / double quant / blocksize), but modules {first_name} and {name} "
                f"differ: {diff}; re-compress with one setting or export --to onnx")
    return first


def _skeleton(config):
    """The model built from ``config`` with every parameter on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _hf_tied_aliases(model) -> dict[str, str]:
    """{parameter name: first name sharing the same Parameter} for weights the model ties itself."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        alias[name] = first.setdefault(id(p), name)
    return alias


def supported_formats() -> dict[str, str]:
    """{module format: what it becomes in the bitsandbytes folder}."""
    return {fmt: desc for fmt, (desc, _) in HF_BNB_FORMATS.items()}


def bnb_quantization_config(modules: dict, skip_modules: list[str]) -> dict:
    """``quantization_config`` exactly as transformers writes it for these packed modules."""
    import torch
    from transformers import BitsAndBytesConfig

    args = dict(_shared_bnb_args(modules))
    args.pop("blocksize")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=getattr(torch, BNB_COMPUTE_DTYPE),
                             llm_int8_skip_modules=list(skip_modules), **args)
    return cfg.to_dict()


def export_hf_bnb(out_dir: Union[str, Path], dest: Union[str, Path], overwrite: bool = False) -> Path:
    """Write ``dest``: a folder ``AutoModelForCausalLM.from_pretrained(dest)`` loads with bitsandbytes."""
    from torch import nn
    from transformers import AutoConfig

    from quantkit.io.export_checks import check_export_paths, check_exportable

    out_dir, dest = check_export_paths(out_dir, dest, overwrite)
    info = read_metadata(out_dir)
    try:
        config = AutoConfig.from_pretrained(out_dir, local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{out_dir}/config.json cannot be read: {e}") from None
    skeleton = _skeleton(config)
    head = skeleton.get_output_embeddings()
    head_name = next((n for n, m in skeleton.named_modules() if m is head), "")
    tables = {n: s for n, s in info["modules"].items() if s.get("format") in TABLE_FORMATS
              or (n == head_name and s.get("format") == "intk")}
    modules = {n: s for n, s in info["modules"].items() if n not in tables}
    if not modules:
        raise UsageError(f"{out_dir} has no quantized modules; hf-bnb export needs at least one "
                         "(an unquantized artifact already loads with transformers as it is)")
    check_exportable(modules, "hf-bnb", supported_formats())
    _shared_bnb_args(modules)  # mixed settings fail here, before anything is read
    spanning = [n for n, s in modules.items() if int(s["in_features"]) % int(s["blocksize"])]
    if spanning:
        warnings.warn(
            f"{len(spanning)} module(s) (e.g. {spanning[0]}) have in_features not a multiple of the blocksize, so "
            "absmax blocks span rows; the export is correct (bnb's CUDA and torch backends decode it), but "
            "bitsandbytes' native CPU dequantize_4bit (0.50.x) decodes such layers wrongly", BnbCpuLayoutWarning,
            stacklevel=3)
    existing = getattr(config, "quantization_config", None)
    if existing is not None:
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
        # the artifact's own {"quant_method": "quantkit"} (quantkit's transformers quantizer) is replaced by
        # bitsandbytes' entry, and so is an older artifact's {"quant_method": "gguf", ...} from a .gguf source;
        # anything else is refused
        if str(getattr(method, "value", method)) not in ("gguf", "quantkit"):
            raise FormatError(f"{out_dir}/config.json already has a quantization_config ({method}); "
                              "refusing to replace it")

    _check_tables(skeleton, tables, info["path"])
    linear_names = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)]
    missing = [n for n in modules if n not in dict(skeleton.named_modules())]
    if missing:
        raise FormatError(f"{info['path']}: packed module {missing[0]} does not exist in {type(skeleton).__name__}")
    skip = [n for n in linear_names if n not in modules]
    config.quantization_config = bnb_quantization_config(modules, skip)

    tensors = load_tensors(info)
    _densify_tables(tensors, tables)
    for name, spec in modules.items():
        qkey = f"{name}.weight.quant_state.bitsandbytes__{spec['quant_type']}"
        if qkey not in tensors:
            raise CheckpointError(f"{info['path']}: module {name} has no {qkey}; the artifact is incomplete")
    # weights quantkit stored once: write them back unless transformers ties them on load
    hf_alias = _hf_tied_aliases(skeleton)
    for dropped, kept in info["tied"].items():
        if hf_alias.get(dropped, dropped) == hf_alias.get(kept, kept):
            continue
        tensors[dropped] = tensors[kept].clone()
    del skeleton

    with atomic_output_dir(dest, overwrite) as tmp:
        config.save_pretrained(tmp)
        for p in sorted(out_dir.iterdir()):
            if p.name == "config.json" or is_weight_file(p.name) or p.name.startswith("."):
                continue
            if p.is_dir():
                shutil.copytree(p, tmp / p.name)
            else:
                shutil.copy2(p, tmp / p.name)
        # one model.safetensors up to 2 GB, else shards + index, as transformers writes them
        write_sharded(tmp, [entry_from_tensor(k, t) for k, t in tensors.items()], {"format": "pt"})
        written = json.loads((tmp / "config.json").read_text())
        if written.get("quantization_config", {}).get("quant_method") != "bitsandbytes":
            raise FormatError("transformers did not write quantization_config into config.json")  # pragma: no cover
    return dest
