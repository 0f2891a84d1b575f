"""``AutoModelForCausalLM.from_pretrained(OUT)`` for every quantkit artifact.

quantkit.save writes ``"quantization_config": {"quant_method": "quantkit", ...}`` into
config.json. With quantkit imported, transformers finds our quantizer under that name
(``register_quantization_config`` / ``register_quantizer``) and builds the model onto our
packed modules, with the same tensors ``quantkit.load`` gives:

1. ``_process_model_before_weight_loading``: read the artifact's header (the
   ``quantkit.modules`` table), swap every module it names for an empty packed module
   (BitStack layers holding as many blocks as ``memory_budget`` allows), and load the packed
   modules' tensors from the safetensors files ourselves (only those; a BitStack prefix reads
   only the rows it keeps). Their keys (``weight.absmax``, ``weight.plane1``, ...) are
   hidden from transformers' loader, which knows nothing of them.
2. transformers loads every other tensor (norms, dense embeddings, unpacked linears) as it
   does for any checkpoint.
3. ``_process_model_after_weight_loading``: a packed head tied to the packed embedding is
   bound to its table, the memory held is recorded (``model._quantkit_memory_bytes``).

``save_pretrained`` writes the packed state and quantkit's header metadata, so the folder
loads again in quantkit and in transformers with identical logits.

A memory budget for BitStack: ``memory_budget`` in the config's quantization_config, e.g.
``config = AutoConfig.from_pretrained(OUT); config.quantization_config["memory_budget"] =
"120MB"; AutoModelForCausalLM.from_pretrained(OUT, config=config)``. (transformers gives the
config.json's quantization_config precedence over a ``quantization_config=`` argument and
merges loading attributes only for its own config classes.)

This module imports transformers; ``quantkit.integrations.register_transformers`` imports it
only once transformers' quantizer registry has been imported.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import torch
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "quantkit"


class QuantkitConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config`` of a quantkit artifact.

    format_version: the artifact layout version (quantkit.io.artifact.ARTIFACT_VERSION).
    memory_budget: load a BitStack artifact to fit this many bytes of weights (int, or a size
        string such as "120MB"; see ``quantkit.load``); None loads every block.
    """

    def __init__(self, format_version: int = 1, memory_budget: Union[int, str, None] = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.memory_budget = memory_budget
        unknown = sorted(k for k in kwargs if k != "quant_method")
        if unknown:
            raise ValueError(f"quantkit quantization_config: unknown key {unknown[0]!r}; valid keys: "
                             f"quant_method, format_version, memory_budget")

    def to_dict(self) -> dict:
        out = {"quant_method": QUANT_METHOD, "format_version": self.format_version}
        if self.memory_budget is not None:
            out["memory_budget"] = self.memory_budget
        return out


def _hide_state(module, state_dict, prefix, local_metadata):
    """State-dict hook: drop a packed module's keys while transformers' loader is running."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


class QuantkitHfQuantizer(HfQuantizer):
    """Loads (never creates) quantkit artifacts; ``quantkit compress`` makes them."""

    requires_calibration = True  # the weights arrive packed; transformers cannot pack them on the fly

    def __init__(self, quantization_config: QuantkitConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._hooks: list = []
        self._info: Optional[dict] = None
        self._plan: Optional[dict] = None

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len(set(device_map.values())) > 1:
            raise ValueError("a quantkit model loads onto one device; pass device_map=None or a single device")

    def update_dtype(self, dtype):
        # the packed formats decode to fp32; norms and dense tables keep the dtype the file stores
        return torch.float32 if dtype is None else dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from quantkit.errors import CheckpointError
        from quantkit.io import artifact

        if not checkpoint_files:
            raise CheckpointError("quantkit: from_pretrained found no safetensors files for this artifact")
        folder = Path(checkpoint_files[0]).parent
        info = artifact.read_metadata(folder)
        plan = artifact.plan_load(folder, info, self.quantization_config.memory_budget)
        names = artifact.swap_packed_modules(model, info, plan["blocks"])
        prefixes = tuple(n + "." for n in names)
        # from_pretrained runs this under a meta-device context: tensors read here must be real
        with torch.device("cpu"):
            state = artifact.load_tensors(info, plan["first_rows"], keep=lambda k: k.startswith(prefixes))
        for name in names:
            module = model.get_submodule(name)
            own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            result = module.load_state_dict(own, strict=False, assign=True)
            if result.missing_keys or result.unexpected_keys:
                raise CheckpointError(f"{info['path']}: module {name} does not match its tensors: missing "
                                      f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
            module._is_hf_initialized = True
            self._hooks.append(module._register_state_dict_hook(_hide_state))
        # ties into or out of a packed module are quantkit's (a TiedHead reads the packed table,
        # bound after loading); transformers would look for a dense ``weight`` there
        tied = getattr(model, "all_tied_weights_keys", None)
        if tied:
            model.all_tied_weights_keys = {t: src for t, src in tied.items()
                                           if not t.startswith(prefixes) and not src.startswith(prefixes)}
        # the checkpoint keys of packed modules are loaded above; transformers' report would call them unexpected
        if names:
            ignored = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
            ignored.add("^(?:" + "|".join(re.escape(n) for n in names) + r")\.")
            model._keys_to_ignore_on_load_unexpected = ignored
        self._info, self._plan = info, plan
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from quantkit.io import artifact
        from quantkit.nn import bind_tied_heads

        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        bind_tied_heads(model)
        device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
        for name in self._info["modules"]:
            model.get_submodule(name).to(device)
        model._quantkit_recipe_dict = self._info["recipe"]
        model._quantkit_memory_bytes = artifact.check_loaded_memory(model, self._info, self._plan)
        return model

    def get_state_dict_and_metadata(self, model):
        """What ``save_pretrained`` writes: the packed state (tied tensors once) and quantkit's
        header metadata, as ``quantkit.save`` writes them."""
        from quantkit.io import artifact

        return artifact.artifact_state_and_metadata(model)

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters (peft) train on top of the frozen packed base

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Register the config and quantizer under ``quant_method: "quantkit"`` (idempotent)."""
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return
    register_quantization_config(QUANT_METHOD)(QuantkitConfig)
    register_quantizer(QUANT_METHOD)(QuantkitHfQuantizer)


register()  # importing this module is enough (quantkit.integrations also calls it)
