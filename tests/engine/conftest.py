"""LMDeploy 0.18.0's real engine in test processes: on a GPU when this build
finds a usable one, else on the CPU through the test-only shim
(site/lmdeploy_on_cpu.py). The tests themselves are the same files in
both modes; every engine runs in a subprocess of its own, so neither the
shim nor an engine's state reaches the pytest process or another engine.

HOSTCACHE_ENGINE_MODE=cpu|gpu forces a mode; HOSTCACHE_EXPECT_GPU=1 makes a
missing GPU a failure instead of the CPU mode (the GPU command sets it).
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SITE_DIR = HERE / "site"  # test-only sitecustomize (site/sitecustomize.py)
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def _gpu_usable() -> tuple[bool, str]:
    from lmdeploy_hostcache import build_info

    info = build_info()
    if not info["gpu_usable"]:
        return False, info["reason"]
    import torch

    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    return True, ""


def _mode() -> tuple[Optional[str], str]:
    """('cpu' | 'gpu' | None, why)."""
    if importlib.util.find_spec("lmdeploy") is None:
        return None, "LMDeploy is not installed (scripts/setup.sh)"
    forced = os.environ.get("HOSTCACHE_ENGINE_MODE")
    gpu, why = _gpu_usable()
    if forced == "gpu" or os.environ.get("HOSTCACHE_EXPECT_GPU") == "1":
        return "gpu", "" if gpu else f"a GPU was expected: {why}"
    if forced == "cpu" or not gpu:
        return "cpu", ""
    return "gpu", ""


MODE, MODE_PROBLEM = _mode()


@pytest.fixture(autouse=True)
def _engine_mode_usable() -> None:
    if MODE is None:
        pytest.skip(MODE_PROBLEM)
    if MODE_PROBLEM:
        pytest.fail(MODE_PROBLEM)


def engine_env(**extra: str) -> dict:
    """The environment of an engine process: the shim switched on in CPU mode."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               HOSTCACHE_TEST_START_RACE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
    if MODE == "cpu":
        env["HOSTCACHE_TEST_LMDEPLOY_ON_CPU"] = "1"
        # Two cores for a few engines: one torch thread each keeps them from thrashing.
        env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(no log: {e})"


def stop_tree(proc: subprocess.Popen, grace: float) -> None:
    """Stop `proc` and every process it started: SIGINT and `grace` seconds
    to shut down cleanly (grace 0: none), then SIGKILL to whatever is left."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        kids = []
    if proc.poll() is None and grace > 0:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    for p in kids:
        try:
            p.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def in_private_netns(cmd: list[str]) -> list[str]:
    """`cmd` inside a new network namespace with only loopback up: servers it
    starts (the API server, its engine process, anything listening on all
    interfaces) are unreachable from outside and reach nothing outside."""
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]


def netns_problem() -> Optional[str]:
    """Why a private network namespace cannot be made here, or None."""
    try:
        r = subprocess.run(in_private_netns(["true"]), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare --net failed: {e}"
    return None if r.returncode == 0 else f"unshare --net failed: {r.stderr.strip()[:200]}"


class EngineRuns:
    """Starts driver scripts (one engine process each), `parallel` at a
    time, and collects the JSON each writes; a run that fails gives its log."""

    def __init__(self, out: Path, parallel: int, timeout: float):
        self.out, self.parallel, self.timeout = out, parallel, timeout

    def run(self, jobs: dict[str, list[str]], env: Optional[dict] = None, netns: bool = False) -> dict:
        """name -> argv after `python`; returns name -> result dict or error string.
        Each argv gets `--out FILE` appended. netns: in a private network
        namespace of its own (servers that listen)."""
        env = env or engine_env()
        pending = list(jobs.items())
        running: dict[str, tuple[subprocess.Popen, object, float]] = {}
        results: dict = {}
        try:
            while pending or running:
                while pending and len(running) < self.parallel:
                    name, argv = pending.pop(0)
                    log = open(self.out / f"{name}.log", "w")
                    cmd = [sys.executable, *argv, "--out", str(self.out / f"{name}.json")]
                    cmd = in_private_netns(cmd) if netns else cmd
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
                    running[name] = (proc, log, time.monotonic())
                for name, (proc, log, t0) in list(running.items()):
                    rc = proc.poll()
                    if rc is None and time.monotonic() - t0 < self.timeout:
                        continue
                    if rc is None:
                        stop_tree(proc, grace=0)
                    log.close()
                    del running[name]
                    path = self.out / f"{name}.json"
                    if rc == 0 and path.exists():
                        results[name] = json.loads(path.read_text())
                    else:
                        why = "timed out" if rc is None else f"exit code {rc}"
                        results[name] = f"{name}: {why}\n--- log tail ---\n{tail(self.out / f'{name}.log')}"
                time.sleep(0.2)
        finally:
            for proc, log, _ in running.values():
                stop_tree(proc, grace=0)
                log.close()
        return results


def get(results: dict, name: str) -> dict:
    res = results[name]
    if not isinstance(res, dict):
        pytest.fail(res)
    return res


@pytest.fixture(scope="session")
def engine_mode() -> str:
    return MODE


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """$HOSTCACHE_TINY_MODEL when it names a built model (scripts/gpu_all.sh
    builds one), else one built now (a few seconds, CPU)."""
    given = os.environ.get("HOSTCACHE_TINY_MODEL")
    if given and (Path(given) / "config.json").exists():
        return given
    import tiny_model

    return str(tiny_model.build(tmp_path_factory.mktemp("hc-tiny")))
