"""Processes of the engine tests: drivers started and stopped as a group,
private network namespaces, log tails. Plain helpers (no torch, no
LMDeploy): the driver scripts import them too."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent.parent


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(no log: {e})"


def start(cmd: list[str], **kwargs) -> subprocess.Popen:
    """A process in a session (process group) of its own, so that stop_tree
    finds what it started even after it exited and its children were
    reparented."""
    return subprocess.Popen(cmd, start_new_session=True, **kwargs)


def stop_tree(proc: subprocess.Popen, grace: float) -> None:
    """Stop `proc` and every process of its group (start()): SIGINT and
    `grace` seconds to shut down cleanly (grace 0: none), then SIGKILL to
    whatever is left, the group included."""
    if proc.poll() is None and grace > 0:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
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

    def run(self, jobs: dict[str, list[str]], env: dict, netns: bool = False) -> dict:
        """name -> argv after `python`; returns name -> result dict or error string.
        Each argv gets `--out FILE` appended. netns: in a private network
        namespace of its own (servers that listen)."""
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
                    proc = start(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
                    running[name] = (proc, log, time.monotonic())
                for name, (proc, log, t0) in list(running.items()):
                    rc = proc.poll()
                    if rc is None and time.monotonic() - t0 < self.timeout:
                        continue
                    stop_tree(proc, grace=0)  # and whatever it left behind
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


