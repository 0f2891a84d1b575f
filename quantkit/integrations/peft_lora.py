"""LoRA / DoRA with peft on quantkit's packed linears (docs/peft.md).

After ``register_peft()`` (``import quantkit`` calls it), peft's own API works on a
quantkit model::

    model = quantkit.compress(quantkit.load_model("smollm2-135m"), "recipes/nf4.yaml")
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))

How: peft 0.22 has no registry of layer dispatchers; its one extension point for layer
types it does not know is the per-config mapping ``LoraConfig._register_custom_module({base
class: LoRA layer class})``, which its dispatch consults before every built-in one.
``register_peft`` wraps ``LoraConfig.__post_init__`` so every LoraConfig (yours, and the
ones ``PeftModel.from_pretrained`` rebuilds from adapter_config.json) carries our mapping
for the five packed linear classes (a mapping you register yourself for one of them wins).
A config made before registration can be given it with ``add_to_config(config)``.

``import quantkit`` stays light: peft (which imports transformers) is not imported here. If
peft is already imported, registration happens at once; otherwise a one-shot import hook
registers right after ``import peft`` finishes. Without peft installed nothing happens.
"""

from __future__ import annotations

import functools

_PEFT = "peft"
_state = {"registered": False, "hook": None}


def register_peft() -> None:
    """Make peft's LoRA/DoRA accept quantkit's packed linears. Idempotent; a no-op without peft."""
    if _state["registered"] or _state["hook"]:
        return
    from quantkit.integrations._after_import import after_import

    _state["hook"] = True  # one pending hook is enough
    after_import(_PEFT, _register_now)


def is_registered() -> bool:
    """Whether LoraConfig now carries quantkit's mapping (False until peft is imported)."""
    return _state["registered"]


def add_to_config(config):
    """``config`` (a peft LoraConfig) with quantkit's mapping registered; returns it."""
    from quantkit.integrations._peft_layer import custom_modules

    own = config._custom_modules or {}
    mapping = {k: v for k, v in custom_modules().items() if k not in own}
    if mapping:
        config._register_custom_module(mapping)
    return config


def _register_now() -> None:
    from peft import LoraConfig

    from quantkit.integrations import _peft_layer  # noqa: F401  (fails here, not in every LoraConfig, if peft changed)

    original = LoraConfig.__post_init__
    if not getattr(original, "_quantkit", False):
        @functools.wraps(original)
        def __post_init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            add_to_config(self)

        __post_init__._quantkit = True
        LoraConfig.__post_init__ = __post_init__
    _state["registered"] = True
