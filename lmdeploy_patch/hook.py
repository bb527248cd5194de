"""Declaring a hook on LMDeploy: what to wrap, which parameters it must
still take, and the wrapper, in one decorator.

    @wrap("lmdeploy.pytorch.paging.block_trie.node", "Node.attach_to", ["self", "parent"])
    def attach_to(original, self, parent):
        original(self, parent)
        ...

When the module is imported (import_hooks), the target is looked up, checked
(it exists, is the kind of object expected, and its parameters start with
the names given: compat.require_params) and replaced through the patcher by
a function that calls the wrapper with LMDeploy's original first. A failed
check reverts every patch (compat.apply): LMDeploy then runs untouched.

Kinds: "function" (a module function or a plain method), "staticmethod"
(kept a staticmethod), "classmethod" (kept one; the wrapper gets the class
after the original), "property" (the getter is wrapped; setter and
deleter kept). A declaration of the wrong kind is refused at install. An
async wrapper (`async def`) makes an async replacement and must wrap an
async original (LMDeploy decorates some, so the check unwraps them). The
replacement keeps the original's name and docstring (LMDeploy's CLI uses
docstrings as help texts).
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Sequence

from .compat import STATE, IncompatibleLMDeploy, apply, require_attr, require_params
from .import_hooks import when_imported

KINDS = ("function", "staticmethod", "classmethod", "property")


def _resolve(module: Any, module_name: str, target: str) -> tuple[Any, str, str]:
    """(owner, attribute, the owner's qualified name for messages)."""
    *path, attr = target.split(".")
    owner, where = module, module_name
    for part in path:
        owner = require_attr(owner, part, where)
        where = f"{where}.{part}"
    return owner, attr, where


def _descriptor(owner: Any, attr: str) -> Any:
    """The attribute as stored (a staticmethod or property object, not what it yields)."""
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if attr in vars(klass):
                return vars(klass)[attr]
    return getattr(owner, attr)


def original_of(owner: Any, attr: str, kind: str, params: Sequence[str], where: str) -> Callable:
    """LMDeploy's function behind `owner.attr`, checked."""
    require_attr(owner, attr, where)
    raw = _descriptor(owner, attr)
    name = f"{where}.{attr}"
    if kind == "staticmethod":
        if not isinstance(raw, staticmethod):
            raise IncompatibleLMDeploy(f"{name} is no longer a staticmethod")
        raw = raw.__func__
    elif kind == "classmethod":
        if not isinstance(raw, classmethod):
            raise IncompatibleLMDeploy(f"{name} is no longer a classmethod")
        raw = raw.__func__
    elif kind == "property":
        if not isinstance(raw, property):
            raise IncompatibleLMDeploy(f"{name} is no longer a property")
        raw = raw.fget
    elif isinstance(raw, (staticmethod, classmethod, property)):
        raise IncompatibleLMDeploy(f"{name} is a {type(raw).__name__}, not a plain function")
    return require_params(raw, params, name)


def install(owner: Any, attr: str, kind: str, original: Callable, wrapper: Callable) -> Callable:
    """Replaces owner.attr by `wrapper` bound to `original`; returns the replacement's function."""
    import inspect  # here, not at the top: hook modules load at every interpreter start

    if inspect.iscoroutinefunction(wrapper) != inspect.iscoroutinefunction(inspect.unwrap(original)):
        raise IncompatibleLMDeploy(f"{original.__qualname__} and its hook disagree on being async")
    if inspect.iscoroutinefunction(wrapper):
        @functools.wraps(original)
        async def hooked(*args: Any, **kwargs: Any) -> Any:
            return await wrapper(original, *args, **kwargs)
    else:
        @functools.wraps(original)
        def hooked(*args: Any, **kwargs: Any) -> Any:
            return wrapper(original, *args, **kwargs)
    value: Any = hooked
    if kind == "staticmethod":
        value = staticmethod(hooked)
    elif kind == "classmethod":
        value = classmethod(hooked)
    elif kind == "property":
        value = _descriptor(owner, attr).getter(hooked)
    STATE.patcher.setattr(owner, attr, value)
    return hooked


def wrap(module_name: str, target: str, params: Sequence[str], kind: str = "function") -> Callable:
    """Decorator declaring a hook (module docstring). Returns the wrapper unchanged."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def register(wrapper: Callable) -> Callable:
        def on_import(module: Any) -> None:
            def patch() -> None:
                owner, attr, where = _resolve(module, module_name, target)
                install(owner, attr, kind, original_of(owner, attr, kind, params, where), wrapper)

            apply(f"{module_name}:{target}", patch)

        when_imported(module_name)(on_import)
        return wrapper

    return register


def rebind_by_name(module: Any, name: str, replacement: Callable[..., Any]) -> None:
    """`module` bound `name` with `from ... import name`: make it `replacement`
    (a function `install` made) through the patcher, so that a revert restores
    LMDeploy's original. If the module imported after the patch it already
    holds the replacement: the original is put back first, so that the patcher
    records the original as the value to restore."""
    original = getattr(replacement, "__wrapped__", None)
    bound = getattr(module, name, None)
    if original is None or bound not in (original, replacement):
        return  # someone else's binding: leave it
    if bound is replacement:
        setattr(module, name, original)  # what LMDeploy would have bound without us
    STATE.patcher.setattr(module, name, replacement)


def rebind(module_name: str, name: str, source_module: str) -> None:
    """Declares that `module_name` bound `source_module.name` by name: once it
    is imported, that binding points at the hooked function (rebind_by_name)."""

    def on_import(module: Any) -> None:
        def patch() -> None:
            source = sys.modules.get(source_module)
            if source is not None:
                rebind_by_name(module, name, getattr(source, name))

        apply(f"{module_name}:{name} binding", patch)

    when_imported(module_name)(on_import)
