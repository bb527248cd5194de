"""Which LMDeploy these hooks were written for, and the checks that keep a
different one untouched.

Every hook module calls `guard()` before patching and `require_*` for each
private name it relies on; a failed check reverts every patch made so far
and logs one line, so LMDeploy runs exactly as it would without this project."""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from .patcher import Patcher

EXPECTED_VERSION = "0.18.0"


class IncompatibleLMDeploy(RuntimeError):
    """A hooked name is missing or has another signature."""


class _State:
    def __init__(self) -> None:
        self.enabled: bool | None = None  # None: not checked yet
        self.reason = ""
        self.patcher = Patcher()
        self.applied: list[str] = []


STATE = _State()


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmdeploy")
    except PackageNotFoundError:
        return "unknown"


def disabled_by_env() -> bool:
    """LMDEPLOY_HOSTCACHE_DISABLE=1 (or true, yes) keeps LMDeploy unpatched."""
    return os.environ.get("LMDEPLOY_HOSTCACHE_DISABLE", "") in ("1", "true", "yes")


def guard() -> bool:
    """True when patching may go on. The first call checks the version."""
    if STATE.enabled is None:
        if disabled_by_env():
            STATE.enabled, STATE.reason = False, "disabled by LMDEPLOY_HOSTCACHE_DISABLE"
            return False
        found = _installed_version()
        if found != EXPECTED_VERSION:
            disable(f"LMDeploy {found} is installed but lmdeploy-hostcache supports only {EXPECTED_VERSION}")
            return False
        STATE.enabled = True
    return bool(STATE.enabled)


def disable(reason: str) -> None:
    """Undo every patch and say why, once."""
    STATE.patcher.revert()
    if STATE.enabled is not False:
        from .log import logger

        logger.warning("lmdeploy-hostcache: host cache unavailable, LMDeploy left untouched: %s", reason)
    STATE.enabled, STATE.reason = False, reason
    STATE.applied.clear()


def require_attr(owner: Any, name: str, where: str) -> Any:
    if not hasattr(owner, name):
        raise IncompatibleLMDeploy(f"{where}.{name} is missing")
    return getattr(owner, name)


def require_params(fn: Callable, expected: Sequence[str], where: str) -> Callable:
    """Checks that fn's parameters start with `expected` (names, in order)."""
    import inspect  # here, not at the top: this module loads at every interpreter start

    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError) as e:
        raise IncompatibleLMDeploy(f"{where}: cannot read its signature ({e})") from e
    if params[: len(expected)] != list(expected):
        raise IncompatibleLMDeploy(f"{where} has parameters {params}, expected {list(expected)}")
    return fn


def apply(name: str, patch: Callable[[], None]) -> None:
    """Runs one hook module's patch under the guard; on a failed check,
    reverts everything."""
    if not guard():
        return
    try:
        patch()
        STATE.applied.append(name)
    except IncompatibleLMDeploy as e:
        disable(str(e))
    except Exception as e:  # noqa: BLE001 - a bug in a hook must not break `import lmdeploy`
        disable(f"patch {name!r} failed: {type(e).__name__}: {e}")
