"""Shared fixtures for the LMDeploy integration tests.

LMDeploy is imported once per test process. Tests that need a fresh
interpreter (activation through the .pth file, disabling, version mismatch,
the console entry point) run their scripts as subprocesses: all are started
together once collection is done, and the tests reading them are moved to the
end of the run, so that their ~3 s imports overlap with the in-process tests.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from typing import Any

import pytest

_ACTIVATION = """
import lmdeploy
from lmdeploy import PytorchEngineConfig
print(PytorchEngineConfig(host_cache_ratio=2).host_cache_ratio)
"""

_DISABLED = """
import lmdeploy, lmdeploy_patch
from lmdeploy import PytorchEngineConfig as P, TurbomindEngineConfig as T
import lmdeploy.cli.utils as u
print(hasattr(P, 'host_cache_ratio'), 'host_cache_ratio' in P.__dataclass_fields__,
      hasattr(T, 'host_cache_ratio'), hasattr(u.ArgumentHelper.enable_prefix_caching, '__wrapped__'))
print(lmdeploy_patch.status()['enabled'])
"""

_CHECK_UNTOUCHED = """
import sys
import lmdeploy, lmdeploy_patch
import lmdeploy.archs, lmdeploy.cli.utils, lmdeploy.pytorch.config, lmdeploy.pytorch.engine.config_builder
from lmdeploy import PytorchEngineConfig as P, TurbomindEngineConfig as T
from lmdeploy.pytorch.config import CacheConfig
touched = [hasattr(P, 'host_cache_ratio'), hasattr(T, 'host_cache_size'), hasattr(CacheConfig, 'host_cache_ratio'),
           hasattr(lmdeploy.archs.autoget_backend_config, '__wrapped__'),
           hasattr(sys.modules['lmdeploy.pipeline'].autoget_backend_config, '__wrapped__'),
           hasattr(lmdeploy.cli.utils.ArgumentHelper.enable_prefix_caching, '__wrapped__'),
           '__wrapped__' in vars(P.__init__), len(lmdeploy_patch.compat.STATE.patcher)]
print('touched', touched)
print('status', lmdeploy_patch.status()['enabled'], lmdeploy_patch.status()['reason'])
try:
    P(host_cache_ratio=2)
except TypeError:
    print('field refused')
"""

_VERSION_MISMATCH = """
import lmdeploy_patch.compat as compat
compat._installed_version = lambda: '0.17.0'
""" + _CHECK_UNTOUCHED

# A hooked private name whose signature changed: ConfigBuilder.build_cache_config
# is given another parameter name by a hook that runs before ours.
_SIGNATURE_CHANGED = """
from lmdeploy_patch import import_hooks

def _break(module):
    module.ConfigBuilder.build_cache_config = staticmethod(lambda cfg: None)

import_hooks._hooks.setdefault('lmdeploy.pytorch.engine.config_builder', []).insert(0, _break)
""" + _CHECK_UNTOUCHED

SCRIPTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "activation": (["-c", _ACTIVATION], {}),
    "disabled": (["-c", _DISABLED], {"LMDEPLOY_HOSTCACHE_DISABLE": "1"}),
    "version_mismatch": (["-c", _VERSION_MISMATCH], {}),
    "signature_changed": (["-c", _SIGNATURE_CHANGED], {}),
    "api_server_help": (["-m", "lmdeploy", "serve", "api_server", "--help"], {}),
    "turbomind_explicit": (["-m", "lmdeploy", "serve", "api_server", "no-such-model", "--backend", "turbomind",
                            "--host-cache"], {}),
}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


class _Runs:
    """Starts every script at once; `get` waits for one."""

    def __init__(self) -> None:
        self._cwd = tempfile.mkdtemp(prefix="lmdeploy-hostcache-tests-")  # keeps the repo off sys.path
        self._procs: dict[str, subprocess.Popen] = {}
        self._done: dict[str, Run] = {}
        for name, (argv, extra_env) in SCRIPTS.items():
            env = {k: v for k, v in os.environ.items() if k != "LMDEPLOY_HOSTCACHE_DISABLE"}
            env.update(extra_env)
            env["PYTHONUNBUFFERED"] = "1"
            args = [sys.executable, *[textwrap.dedent(a) for a in argv]]
            self._procs[name] = subprocess.Popen(args, cwd=self._cwd, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True)

    def get(self, name: str) -> Run:
        if name not in self._done:
            out, err = self._procs[name].communicate(timeout=120)
            self._done[name] = Run(self._procs[name].returncode, out, err)
        return self._done[name]

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


_STARTED: list[_Runs] = []


def _start_runs() -> _Runs:
    if not _STARTED:
        _STARTED.append(_Runs())
    return _STARTED[0]


@pytest.hookimpl(trylast=True)  # after -k/-m deselection
def pytest_collection_modifyitems(session: Any, config: Any, items: list) -> None:
    readers = [item for item in items if "runs" in getattr(item, "fixturenames", ())]
    if readers:
        items[:] = [item for item in items if "runs" not in getattr(item, "fixturenames", ())] + readers
        _start_runs()


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    for started in _STARTED:
        started.close()


@pytest.fixture(scope="session")
def runs() -> Any:
    return _start_runs()


@pytest.fixture(scope="session")
def cli_parser() -> Any:
    """LMDeploy's real top-level parser, built the way `cli/entrypoint.py run()`
    builds it (once per process: argparse refuses a second subparser of the
    same name)."""
    from lmdeploy.cli.cli import CLI
    from lmdeploy.cli.lite import SubCliLite
    from lmdeploy.cli.serve import SubCliServe

    CLI.add_parsers()
    SubCliServe.add_parsers()
    SubCliLite.add_parsers()
    return CLI.parser


@pytest.fixture
def hostcache_log(caplog: Any) -> Any:
    """The records of the lmdeploy_hostcache logger."""
    import logging

    caplog.set_level(logging.WARNING, logger="lmdeploy_hostcache")

    def records() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "lmdeploy_hostcache"]

    return records
