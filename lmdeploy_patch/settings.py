"""The host-cache settings: names, defaults, accepted values, and the small
helpers every layer uses to read them from any config (engine config, cache
config, argparse namespace).

How the settings become real fields of LMDeploy's configs is config_fields.py;
the CLI flags are cli_flags.py. Nothing here imports LMDeploy, torch or
numpy at module level: hook modules import this at every interpreter start.
"""
from __future__ import annotations

import contextlib
import os
import contextvars
from typing import Any, Iterator, Mapping

HOST_CACHE_FIELDS: tuple[str, ...] = ("host_cache_ratio", "host_cache_size", "host_cache_write_policy",
                                      "host_cache_restore_policy", "host_cache_verify", "host_cache_store")
WRITE_POLICIES: tuple[str, ...] = ("write_through", "write_through_selective", "write_back")
DEFAULT_WRITE_POLICY = "write_through"
# Whether a host hit is restored or recomputed (restore_decision.py).
RESTORE_POLICIES: tuple[str, ...] = ("auto", "always", "never")
DEFAULT_RESTORE_POLICY = "auto"
FIELD_DEFAULTS: dict[str, Any] = {
    "host_cache_ratio": 0.0,
    "host_cache_size": None,
    "host_cache_write_policy": DEFAULT_WRITE_POLICY,
    "host_cache_restore_policy": DEFAULT_RESTORE_POLICY,
    # Checksums of saved blocks, checked before a restore is used (slot_ledger.py).
    "host_cache_verify": False,
    # A Mooncake Store behind the host pool: the path of its JSON config (store_tier.py).
    "host_cache_store": None,
}
FIELD_TYPES: dict[str, Any] = {"host_cache_ratio": float, "host_cache_size": float | None,
                               "host_cache_write_policy": str, "host_cache_restore_policy": str, "host_cache_verify": bool,
                               "host_cache_store": str | None}
# What `--host-cache` turns on: host pool = 4 x this rank's GPU KV-cache bytes.
DEFAULT_HOST_CACHE_RATIO = 4.0


class DefaultRatio(float):
    """A ratio `--host-cache` chose, not the user: pool sizing shrinks it to
    what fits instead of refusing it (pool_sizing.py). Equal to the plain
    number everywhere else; pickles as itself (the executor's workers)."""

    def __reduce__(self) -> tuple:
        return DefaultRatio, (float(self),)
GIB = 1 << 30

RATIO_RANGE = ("a finite number >= 0 (0 = off; host pool bytes per rank = ratio x that rank's "
               "GPU KV-cache bytes)")
SIZE_RANGE = "None (use host_cache_ratio) or a finite number of GiB per rank > 0"

# Values for the next engine config built in this context (see
# `defaults_for_next_config`); a context variable so that concurrent threads
# or tasks building configs do not see each other's values.
_PENDING: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "lmdeploy_hostcache_pending_config_values", default=None)


def ram_reserve_bytes() -> int:
    """RAM left to the rest of the machine when the pool is sized: the core's
    default (lmdeploy_hostcache.config), or HOSTCACHE_RAM_RESERVE_GIB (tests
    pass 0; so can a machine whose RAM grows as it is used, where
    MemAvailable at start-up understates it). Ranks build their pools with
    no reserve of their own, so a size accepted here is not refused again."""
    from lmdeploy_hostcache.config import DEFAULT_RESERVE_BYTES

    text = os.environ.get("HOSTCACHE_RAM_RESERVE_GIB")
    if text is None or text.strip() == "":
        return DEFAULT_RESERVE_BYTES
    try:
        gib = float(text)
    except ValueError:
        gib = -1.0
    if not gib >= 0 or gib == float("inf"):
        raise ValueError(f"HOSTCACHE_RAM_RESERVE_GIB={text!r}: give the GiB of RAM to leave free as a number >= 0 "
                         f"(unset: {DEFAULT_RESERVE_BYTES / GIB:g})")
    return int(gib * GIB)


def slot_stride(block_bytes: int) -> int:
    """Bytes one host slot of a `block_bytes` block takes (the core's alignment)."""
    from lmdeploy_hostcache import slot_stride as core_stride

    return core_stride(block_bytes)


# ----- validation (also used by the CLI flags, with the flag's name as label)

def is_number(value: object) -> bool:
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite_number(value: object, name: str, accepted: str) -> float:
    import math

    if not is_number(value):
        kind = "a bool" if isinstance(value, bool) else type(value).__name__
        raise TypeError(f"{name} must be a number, got {kind} {value!r}; accepted: {accepted}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}; accepted: {accepted}")
    return number


def check_ratio(value: object, name: str = "host_cache_ratio") -> float:
    """The validated ratio as a float; TypeError/ValueError name `name` and the range."""
    number = _finite_number(value, name, RATIO_RANGE)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}; accepted: {RATIO_RANGE}")
    return DefaultRatio(number) if isinstance(value, DefaultRatio) else number


def ram_budget() -> tuple[int, str]:
    """(bytes this process can take, which limit said so): the smaller of
    MemAvailable and its cgroups' limits less their use (the core's
    memory_info.h)."""
    from lmdeploy_hostcache import ram_budget as core_budget  # lazily: loads the compiled core

    available, source = core_budget()
    return int(available), source


def usable_ram_gib() -> tuple[float, str]:
    """(the largest host_cache_size accepted now: the RAM budget minus the
    reserve, in GiB; which limit applied)."""
    available, source = ram_budget()
    return max(0, available - ram_reserve_bytes()) / GIB, source


def max_host_cache_gib() -> float:
    """Largest host_cache_size accepted now: available RAM minus the reserve, in GiB."""
    return usable_ram_gib()[0]


def check_size(value: object, name: str = "host_cache_size", *, check_ram: bool = True) -> float | None:
    """The validated size in GiB (None = use the ratio). With `check_ram`, a size
    larger than the available RAM minus the reserve is refused."""
    if value is None:
        return None
    number = _finite_number(value, name, SIZE_RANGE)
    if number <= 0:
        raise ValueError(f"{name} must be > 0 GiB, got {value!r}; accepted: {SIZE_RANGE}")
    if check_ram:
        limit, source = usable_ram_gib()
        if number > limit:
            raise ValueError(
                f"{name}={number:g} GiB does not fit in host memory: {limit:.2f} GiB available after "
                f"a {ram_reserve_bytes() / GIB:g} GiB reserve (limit: {source}); accepted: None or "
                f"0 < {name} <= {limit:.2f} (GiB per rank)")
    return number


def check_policy(value: object, name: str = "host_cache_write_policy",
                 accepted: tuple[str, ...] = WRITE_POLICIES) -> str:
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(accepted)}; got {value!r}")
    return value


def check_restore_policy(value: object, name: str = "host_cache_restore_policy") -> str:
    return check_policy(value, name, RESTORE_POLICIES)


def check_verify(value: object, name: str = "host_cache_verify") -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {type(value).__name__} {value!r}")
    return value


STORE_RANGE = "None, or the path of a Mooncake Store JSON config (the format LMDeploy's Mooncake connector reads)"


def check_store(value: object, name: str = "host_cache_store") -> str | None:
    """The path, once its file reads as a Mooncake config; the error names
    `name`, the file and the key to change. The store itself is reached only
    when the engine starts (an unreachable one leaves the host tier alone)."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be {STORE_RANGE}; got {value!r}")
    from lmdeploy_hostcache.mooncake_store import StoreConfig

    try:
        StoreConfig.from_file(value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return os.path.abspath(value)  # the workers may start in another directory


def validate_host_cache_values(values: Mapping[str, Any], *, check_ram: bool = True) -> dict[str, Any]:
    """All the fields (missing ones take their defaults), validated and normalised."""
    merged = {**FIELD_DEFAULTS, **values}
    unknown = set(merged) - set(HOST_CACHE_FIELDS)
    if unknown:
        raise TypeError(f"unknown host-cache settings {sorted(unknown)}; known: {list(HOST_CACHE_FIELDS)}")
    checked = {
        "host_cache_ratio": check_ratio(merged["host_cache_ratio"]),
        "host_cache_size": check_size(merged["host_cache_size"], check_ram=check_ram),
        "host_cache_write_policy": check_policy(merged["host_cache_write_policy"]),
        "host_cache_restore_policy": check_restore_policy(merged["host_cache_restore_policy"]),
        "host_cache_verify": check_verify(merged["host_cache_verify"]),
        "host_cache_store": check_store(merged["host_cache_store"]),
    }
    if checked["host_cache_store"] is not None and not host_cache_requested(_Values(checked)):
        # The store sits behind the host pool: its puts and gets go through host slots.
        raise ValueError("host_cache_store needs the host pool it sits behind: set host_cache_ratio > 0 or "
                         "host_cache_size too (on the CLI, --host-cache-store turns --host-cache on)")
    return checked


class _Values:
    def __init__(self, values: Mapping[str, Any]):
        self.__dict__.update(values)


def validate_host_cache_fields(cfg: Any, *, check_ram: bool = True) -> None:
    """Re-checks a config's current values. Useful where LMDeploy sets the
    attributes directly and skips `__init__` (`lmdeploy chat` does)."""
    validate_host_cache_values(host_cache_values(cfg), check_ram=check_ram)


# ----- reading any config

def host_cache_values(cfg: Any) -> dict[str, Any]:
    """The host-cache values of `cfg`, defaults for what it lacks."""
    return {name: getattr(cfg, name, default) for name, default in FIELD_DEFAULTS.items()}


def host_cache_requested(cfg: Any) -> bool:
    """True when `cfg` asks for the host tier: ratio > 0 or a size set."""
    if cfg is None:
        return False
    ratio = getattr(cfg, "host_cache_ratio", 0.0)
    return (is_number(ratio) and ratio > 0) or getattr(cfg, "host_cache_size", None) is not None


def copy_host_cache_fields(src: Any, dst: Any) -> None:
    """Sets the host-cache values of `src` on `dst` (values are already validated)."""
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


def take_pending() -> dict[str, Any]:
    """The values `defaults_for_next_config` left for this config, once."""
    pending = _PENDING.get()
    if not pending:
        return {}
    _PENDING.set(None)
    return pending
