"""The host-cache settings (settings.py) as real fields of LMDeploy's configs.

The fields of settings.HOST_CACHE_FIELDS (`host_cache_ratio`, `host_cache_size`,
`host_cache_write_policy`, `host_cache_restore_policy`, `host_cache_verify`) are added in place to `messages.PytorchEngineConfig`, `messages.TurbomindEngineConfig`
(hooks/messages.py) and `pytorch.config.CacheConfig` (hooks/pytorch_config.py).

Why in place and not subclasses: LMDeploy tests `type(cfg) is
TurbomindEngineConfig` and binds the classes with `from ... import`, so only
the original classes work everywhere. A field is added as (a) an entry in
`__dataclass_fields__` (so `asdict`, `fields`, `dataclasses.replace` and the
TurboMind-to-PyTorch conversion see it), (b) a class attribute holding the
default (so `hasattr(cls, name)` is True, which `cli/chat.py` relies on, and
an instance without the attribute still reads the default) and (c) a wrapped
`__init__` that pops the keyword, validates it and stores it on the instance
(so `deepcopy` and `pickle`, which copy `__dict__`, carry it).

Known limit, LMDeploy's and not ours: `dataclasses.replace` on a
`TurbomindEngineConfig` fails even without this package (pydantic rejects the
None defaults of its int fields); `replace` on `PytorchEngineConfig` and
`CacheConfig` carries the fields.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from .compat import STATE, IncompatibleLMDeploy, require_attr
from .settings import (FIELD_DEFAULTS, FIELD_TYPES, HOST_CACHE_FIELDS, host_cache_requested, host_cache_values,
                       take_pending, validate_host_cache_values)


def _make_field(name: str, default: Any = None, type_: Any = None) -> Any:
    import dataclasses

    field = dataclasses.field(default=FIELD_DEFAULTS[name] if type_ is None else default, kw_only=True)
    field.name = name
    field.type = FIELD_TYPES[name] if type_ is None else type_
    # What @dataclass sets on a regular field; fields()/asdict()/replace()
    # select on it.
    field._field_type = dataclasses._FIELD  # noqa: SLF001 - stdlib marker, stable since 3.7
    return field


def _wrap_init(original: Callable[..., None], *, check_ram: bool, takes_pending: bool) -> Callable[..., None]:
    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        given = {name: kwargs.pop(name) for name in HOST_CACHE_FIELDS if name in kwargs}
        if takes_pending:
            given = {**take_pending(), **given}
        values = validate_host_cache_values(given, check_ram=check_ram)
        original(self, *args, **kwargs)
        for name, value in values.items():
            # object.__setattr__: pydantic dataclasses may validate assignment.
            object.__setattr__(self, name, value)

    return __init__


def _wrap_eq(original: Callable[[Any, Any], Any],
             values: Callable[[Any], Any] = host_cache_values) -> Callable[[Any, Any], Any]:
    # The generated __eq__ compares the fields known at class creation only;
    # without this, configs differing only in our fields compare equal.
    @functools.wraps(original)
    def __eq__(self: Any, other: Any) -> Any:
        result = original(self, other)
        if result is True and other.__class__ is self.__class__:
            return values(self) == values(other)
        return result

    return __eq__


def _wrap_repr(original: Callable[[Any], str]) -> Callable[[Any], str]:
    # The generated __repr__ (what LMDeploy logs as "backend_config=...") knows
    # only the original fields; show ours when the tier is on, so the logs say
    # what the engine was asked for. With the tier off the text is unchanged.
    @functools.wraps(original)
    def __repr__(self: Any) -> str:
        text = original(self)
        if not host_cache_requested(self) or not text.endswith(")"):
            return text
        extra = ", ".join(f"{name}={value!r}" for name, value in host_cache_values(self).items())
        return f"{text[:-1]}, {extra})"

    return __repr__


def add_host_cache_fields(cls: type, where: str, *, check_ram: bool, takes_pending: bool) -> None:
    """Adds the host-cache fields to the dataclass `cls` in place, through the patcher."""
    fields = require_attr(cls, "__dataclass_fields__", where)
    init = require_attr(cls, "__init__", where)
    eq = require_attr(cls, "__eq__", where)
    text = require_attr(cls, "__repr__", where)
    if not all(callable(fn) for fn in (init, eq, text)):
        raise IncompatibleLMDeploy(f"{where}.__init__/__eq__/__repr__ are not all callables")
    for name in HOST_CACHE_FIELDS:
        if name in fields or name in vars(cls):
            raise IncompatibleLMDeploy(f"{where} already defines {name}")
    for name in HOST_CACHE_FIELDS:
        STATE.patcher.setitem(fields, name, _make_field(name))
        STATE.patcher.setattr(cls, name, FIELD_DEFAULTS[name])
    STATE.patcher.setattr(cls, "__init__", _wrap_init(init, check_ram=check_ram, takes_pending=takes_pending))
    STATE.patcher.setattr(cls, "__eq__", _wrap_eq(eq))
    STATE.patcher.setattr(cls, "__repr__", _wrap_repr(text))


def add_checked_field(cls: type, where: str, name: str, default: Any, type_: Any,
                      check: Callable[[Any, str], Any]) -> None:
    """Adds one keyword field to the dataclass `cls` in place (as the
    host-cache fields are added), its value checked by `check(value, name)`
    at construction: `GenerationConfig.cache_salt` (hooks/messages.py)."""
    fields = require_attr(cls, "__dataclass_fields__", where)
    init = require_attr(cls, "__init__", where)
    eq = require_attr(cls, "__eq__", where)
    if name in fields or name in vars(cls):
        raise IncompatibleLMDeploy(f"{where} already defines {name}")

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        value = check(kwargs.pop(name, default), name)
        init(self, *args, **kwargs)
        object.__setattr__(self, name, value)

    STATE.patcher.setitem(fields, name, _make_field(name, default, type_))
    STATE.patcher.setattr(cls, name, default)
    STATE.patcher.setattr(cls, "__init__", __init__)
    STATE.patcher.setattr(cls, "__eq__", _wrap_eq(eq, lambda cfg: getattr(cfg, name, default)))
