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
import importlib.abc
import importlib.util
import sys
import warnings

_PEFT = "peft"
_state = {"registered": False, "hook": None}


def register_peft() -> None:
    """Make peft's LoRA/DoRA accept quantkit's packed linears. Idempotent; a no-op without peft."""
    if _state["registered"]:
        return
    if _PEFT in sys.modules and getattr(sys.modules[_PEFT], "__spec__", None) is not None \
            and not getattr(sys.modules[_PEFT].__spec__, "_initializing", False):
        _register_now()
        return
    if _state["hook"] is None and importlib.util.find_spec(_PEFT) is not None:
        _state["hook"] = _AfterPeftImport()
        sys.meta_path.insert(0, _state["hook"])


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


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds ``peft`` with the other finders and registers once its module has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _PEFT:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us
        _state["hook"] = None
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """Delegates to peft's own loader; registers after ``exec_module`` (a failure there only warns:
    quantkit must never break ``import peft``)."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            _register_now()
        except Exception as e:  # an incompatible peft: LoRA on packed layers will be refused by peft
            warnings.warn(f"quantkit could not register its packed layers with peft {getattr(module, '__version__', '?')}: "
                          f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)

    def __getattr__(self, name):  # get_resource_reader, is_package, get_data, ... of the real loader
        return getattr(self._loader, name)
