"""The host-cache settings as real fields of LMDeploy's configs.

`host_cache_ratio`, `host_cache_size` and `host_cache_write_policy` are added
in place to `messages.PytorchEngineConfig`, `messages.TurbomindEngineConfig`
and `pytorch.config.CacheConfig`, and `ConfigBuilder.build_cache_config`
copies them from the engine config into the cache config the workers get.

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

Nothing here imports LMDeploy, torch or numpy at module level: this module is
imported at every interpreter start by the .pth file.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator, Mapping

from .compat import STATE, IncompatibleLMDeploy, apply, require_attr, require_params
from .import_hooks import when_imported

HOST_CACHE_FIELDS: tuple[str, ...] = ("host_cache_ratio", "host_cache_size", "host_cache_write_policy")
WRITE_POLICIES: tuple[str, ...] = ("write_through", "write_through_selective", "write_back")
DEFAULT_WRITE_POLICY = "write_through"
FIELD_DEFAULTS: dict[str, Any] = {
    "host_cache_ratio": 0.0,
    "host_cache_size": None,
    "host_cache_write_policy": DEFAULT_WRITE_POLICY,
}
# What `--host-cache` turns on: host pool = 4 x this rank's GPU KV-cache bytes.
DEFAULT_HOST_CACHE_RATIO = 4.0
GIB = 1 << 30
# RAM left to the rest of the machine; the same figure as
# lmdeploy_hostcache.HostCacheConfig.reserve_bytes, so that a size accepted
# here is not refused again when the engine builds the pool.
RAM_RESERVE_BYTES = 2 * GIB

_RATIO_RANGE = ("a finite number >= 0 (0 = off; host pool bytes per rank = ratio x that rank's "
                "GPU KV-cache bytes)")
_SIZE_RANGE = "None (use host_cache_ratio) or a finite number of GiB per rank > 0"
_FIELD_TYPES: dict[str, Any] = {"host_cache_ratio": float, "host_cache_size": float | None,
                                "host_cache_write_policy": str}

# Values for the next engine config built in this context (see
# `defaults_for_next_config`); a context variable so that concurrent threads
# or tasks building configs do not see each other's values.
_PENDING: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "lmdeploy_hostcache_pending_config_values", default=None)


# --------------------------------------------------------------------------
# Validation (also used by the CLI flags, with the flag's name as label)
# --------------------------------------------------------------------------

def _is_number(value: object) -> bool:
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite_number(value: object, name: str, accepted: str) -> float:
    import math

    if not _is_number(value):
        kind = "a bool" if isinstance(value, bool) else type(value).__name__
        raise TypeError(f"{name} must be a number, got {kind} {value!r}; accepted: {accepted}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}; accepted: {accepted}")
    return number


def check_ratio(value: object, name: str = "host_cache_ratio") -> float:
    """The validated ratio as a float; TypeError/ValueError name `name` and the range."""
    number = _finite_number(value, name, _RATIO_RANGE)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}; accepted: {_RATIO_RANGE}")
    return number


def max_host_cache_gib() -> float:
    """Largest host_cache_size accepted now: available RAM minus the reserve, in GiB."""
    from lmdeploy_hostcache import available_ram_bytes  # lazily: loads the compiled core

    return max(0, int(available_ram_bytes()) - RAM_RESERVE_BYTES) / GIB


def check_size(value: object, name: str = "host_cache_size", *, check_ram: bool = True) -> float | None:
    """The validated size in GiB (None = use the ratio). With `check_ram`, a size
    larger than the available RAM minus `RAM_RESERVE_BYTES` is refused."""
    if value is None:
        return None
    number = _finite_number(value, name, _SIZE_RANGE)
    if number <= 0:
        raise ValueError(f"{name} must be > 0 GiB, got {value!r}; accepted: {_SIZE_RANGE}")
    if check_ram:
        limit = max_host_cache_gib()
        if number > limit:
            raise ValueError(
                f"{name}={number:g} GiB does not fit in host memory: {limit:.2f} GiB available after "
                f"a {RAM_RESERVE_BYTES / GIB:g} GiB reserve; accepted: None or 0 < {name} <= {limit:.2f} "
                f"(GiB per rank)")
    return number


def check_policy(value: object, name: str = "host_cache_write_policy") -> str:
    if not isinstance(value, str) or value not in WRITE_POLICIES:
        raise ValueError(f"{name} must be one of {', '.join(WRITE_POLICIES)}; got {value!r}")
    return value


def validate_host_cache_values(values: Mapping[str, Any], *, check_ram: bool = True) -> dict[str, Any]:
    """All three fields (missing ones take their defaults), validated and normalised."""
    merged = {**FIELD_DEFAULTS, **values}
    unknown = set(merged) - set(HOST_CACHE_FIELDS)
    if unknown:
        raise TypeError(f"unknown host-cache settings {sorted(unknown)}; known: {list(HOST_CACHE_FIELDS)}")
    return {
        "host_cache_ratio": check_ratio(merged["host_cache_ratio"]),
        "host_cache_size": check_size(merged["host_cache_size"], check_ram=check_ram),
        "host_cache_write_policy": check_policy(merged["host_cache_write_policy"]),
    }


def validate_host_cache_fields(cfg: Any, *, check_ram: bool = True) -> None:
    """Re-checks a config's current values. Useful where LMDeploy sets the
    attributes directly and skips `__init__` (`lmdeploy chat` does)."""
    validate_host_cache_values(host_cache_values(cfg), check_ram=check_ram)


# --------------------------------------------------------------------------
# Helpers for any config (patched or not, engine or cache config, argparse
# namespace)
# --------------------------------------------------------------------------

def host_cache_values(cfg: Any) -> dict[str, Any]:
    """The three values of `cfg`, defaults for what it lacks."""
    return {name: getattr(cfg, name, default) for name, default in FIELD_DEFAULTS.items()}


def host_cache_requested(cfg: Any) -> bool:
    """True when `cfg` asks for the host tier: ratio > 0 or a size set."""
    if cfg is None:
        return False
    ratio = getattr(cfg, "host_cache_ratio", 0.0)
    return (_is_number(ratio) and ratio > 0) or getattr(cfg, "host_cache_size", None) is not None


def copy_host_cache_fields(src: Any, dst: Any) -> None:
    """Sets the three values of `src` on `dst` (values are already validated)."""
    for name, value in host_cache_values(src).items():
        object.__setattr__(dst, name, value)


@contextlib.contextmanager
def defaults_for_next_config(values: Mapping[str, Any]) -> Iterator[None]:
    """Inside the block, the next `PytorchEngineConfig` or `TurbomindEngineConfig`
    built takes `values` for the host-cache fields it is not given explicitly.
    Once only: later configs in the block are not affected. Used by the CLI,
    whose api_server builds its config with a fixed list of keywords."""
    token = _PENDING.set(dict(values))
    try:
        yield
    finally:
        _PENDING.reset(token)


def _take_pending() -> dict[str, Any]:
    pending = _PENDING.get()
    if not pending:
        return {}
    _PENDING.set(None)
    return pending


# --------------------------------------------------------------------------
# Adding the fields to a dataclass
# --------------------------------------------------------------------------

def _make_field(name: str) -> Any:
    import dataclasses

    field = dataclasses.field(default=FIELD_DEFAULTS[name], kw_only=True)
    field.name = name
    field.type = _FIELD_TYPES[name]
    # What @dataclass sets on a regular field; fields()/asdict()/replace()
    # select on it.
    field._field_type = dataclasses._FIELD  # noqa: SLF001 - stdlib marker, stable since 3.7
    return field


def _wrap_init(original: Callable[..., None], *, check_ram: bool, takes_pending: bool) -> Callable[..., None]:
    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        given = {name: kwargs.pop(name) for name in HOST_CACHE_FIELDS if name in kwargs}
        if takes_pending:
            given = {**_take_pending(), **given}
        values = validate_host_cache_values(given, check_ram=check_ram)
        original(self, *args, **kwargs)
        for name, value in values.items():
            # object.__setattr__: pydantic dataclasses may validate assignment.
            object.__setattr__(self, name, value)

    return __init__


def _wrap_eq(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    # The generated __eq__ compares the fields known at class creation only;
    # without this, configs differing only in host-cache settings compare equal.
    @functools.wraps(original)
    def __eq__(self: Any, other: Any) -> Any:
        result = original(self, other)
        if result is True and other.__class__ is self.__class__:
            return host_cache_values(self) == host_cache_values(other)
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
    """Adds the three fields to the dataclass `cls` in place, through the patcher."""
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


def wrap_staticmethod(cls: type, name: str, where: str, params: list[str],
                      make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replaces the staticmethod `cls.name` by `make_wrapper(function)`, kept a
    staticmethod, after checking that it still is one with parameters `params`."""
    require_attr(cls, name, where)
    raw = vars(cls).get(name)
    if not isinstance(raw, staticmethod):
        raise IncompatibleLMDeploy(f"{where}.{name} is no longer a staticmethod")
    original = require_params(raw.__func__, params, f"{where}.{name}")
    STATE.patcher.setattr(cls, name, staticmethod(make_wrapper(original)))


def _wrap_build_cache_config(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    @functools.wraps(original)
    def build_cache_config(engine_config: Any) -> Any:
        cache_config = original(engine_config)
        copy_host_cache_fields(engine_config, cache_config)
        return cache_config

    return build_cache_config


# --------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------

# lmdeploy.messages: the user-facing engine configs. Validation includes the
# RAM check for host_cache_size; these configs take the CLI's pending values.
@when_imported("lmdeploy.messages")
def _on_messages(module: Any) -> None:
    def patch() -> None:
        for name in ("PytorchEngineConfig", "TurbomindEngineConfig"):
            cls = require_attr(module, name, "lmdeploy.messages")
            add_host_cache_fields(cls, f"lmdeploy.messages.{name}", check_ram=True, takes_pending=True)

    apply("config_fields.engine_configs", patch)


# lmdeploy.pytorch.config.CacheConfig: what the executor pushes to every
# worker (pickled), so the workers see the host-cache settings. No RAM check
# here: the user-facing config was checked; the engine checks the real pool.
@when_imported("lmdeploy.pytorch.config")
def _on_pytorch_config(module: Any) -> None:
    def patch() -> None:
        cls = require_attr(module, "CacheConfig", "lmdeploy.pytorch.config")
        add_host_cache_fields(cls, "lmdeploy.pytorch.config.CacheConfig", check_ram=False, takes_pending=False)

    apply("config_fields.cache_config", patch)


# ConfigBuilder.build_cache_config copies a fixed list of fields from the
# engine config into CacheConfig (Engine.__init__ calls it through the class,
# so replacing the staticmethod on the class is seen); without this the
# workers never get our values.
@when_imported("lmdeploy.pytorch.engine.config_builder")
def _on_config_builder(module: Any) -> None:
    def patch() -> None:
        builder = require_attr(module, "ConfigBuilder", "lmdeploy.pytorch.engine.config_builder")
        wrap_staticmethod(builder, "build_cache_config", "lmdeploy.pytorch.engine.config_builder.ConfigBuilder",
                          ["engine_config"], _wrap_build_cache_config)

    apply("config_fields.build_cache_config", patch)

