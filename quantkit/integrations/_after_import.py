"""Run a callback right after a module is imported, without importing it ourselves.

``import quantkit`` must stay light (no transformers, no peft), yet registering with those
libraries has to happen before the user calls them. ``after_import(name, callback)`` calls
``callback()`` at once when module ``name`` is already imported, otherwise from a one-shot
``sys.meta_path`` finder right after the module's code has run. A failing callback only warns:
quantkit must never break the import of another library.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Callable


def after_import(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` once module ``name`` has been imported (now, if it already has).
    Nothing happens if ``name`` is not installed."""
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    if module is not None and not getattr(spec, "_initializing", False):
        _guarded(name, callback)
        return
    # only the top-level package is looked up: find_spec of a submodule would import its parents
    if importlib.util.find_spec(name.partition(".")[0]) is not None:
        sys.meta_path.insert(0, _AfterImport(name, callback))


def _guarded(name: str, callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception as e:  # noqa: BLE001 -- an incompatible version: quantkit's integration is off, nothing else
        version = getattr(sys.modules.get(name.partition(".")[0]), "__version__", "?")
        warnings.warn(f"quantkit could not register with {name} ({version}): {type(e).__name__}: {e}",
                      RuntimeWarning, stacklevel=3)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``name`` with the other finders and wraps its loader so ``callback`` runs after it."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _CallbackLoader(spec.loader, fullname, self.callback)
        return spec


class _CallbackLoader(importlib.abc.Loader):
    """Delegates to the module's own loader; runs the callback after ``exec_module``."""

    def __init__(self, loader, name: str, callback: Callable[[], None]):
        self._loader, self._name, self._callback = loader, name, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _guarded(self._name, self._callback)

    def __getattr__(self, name):  # get_resource_reader, is_package, get_data, ... of the real loader
        return getattr(self._loader, name)
