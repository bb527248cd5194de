"""Post-import hooks: run a function right after a named module has executed.

The .pth file installed next to this package imports `lmdeploy_patch._activate`
at every interpreter start (the API server's spawned engine process and
executor workers included). That registers the hooks below and does nothing
else: LMDeploy is patched only when something imports it.
"""
from __future__ import annotations

import sys
import threading
from types import ModuleType
from typing import Callable

Hook = Callable[[ModuleType], None]

_hooks: dict[str, list[Hook]] = {}
_lock = threading.RLock()


def when_imported(module_name: str) -> Callable[[Hook], Hook]:
    """Decorator: call the function with the module once it has been imported
    (at once if it already is)."""

    def register(fn: Hook) -> Hook:
        with _lock:
            module = sys.modules.get(module_name)
            if module is not None and getattr(module, "__spec__", None) is not None and not initialising(module):
                fn(module)
            else:
                _hooks.setdefault(module_name, []).append(fn)
        return fn

    return register


def initialising(module: ModuleType) -> bool:
    """The module is still executing its body (imported, not yet complete)."""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


class _HookedLoader:
    """Wraps the real loader; runs the hooks after the module body ran."""

    def __init__(self, loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        with _lock:
            hooks = _hooks.pop(self._name, [])
        for fn in hooks:
            fn(module)

    def __getattr__(self, item):  # get_source, is_package, ... of the real loader
        return getattr(self._loader, item)


class _Finder:
    """A meta path finder (the protocol needs no base class; importlib.abc
    would cost milliseconds at every interpreter start)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookedLoader(spec.loader, fullname)
                return spec
        return None


_finder = _Finder()


def install() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
