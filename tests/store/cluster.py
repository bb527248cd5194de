"""A real Mooncake Store on 127.0.0.1 for the tests: `mooncake_master`, the
standalone HTTP metadata server and one storage node (`mooncake_client`),
each a process of its own, stopped by process id. Run it only inside a
network namespace the test made (conftest: in_private_netns): Mooncake's
clients listen on all interfaces whatever they are told."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def store_problem() -> tuple[str, bool]:
    """(why the real store cannot run here, '' when it can; whether that is a
    failure). Without the mooncake package or a private network namespace
    the store tests skip; HOSTCACHE_REQUIRE_STORE=1 (scripts/test.sh sets
    it, setup.sh installs Mooncake) makes a missing package a failure,
    HOSTCACHE_REQUIRE_NETNS=1 a missing namespace."""
    from procs import netns_problem  # tests/engine/procs.py

    try:
        import mooncake.store  # noqa: F401 - its native library needs libibverbs1 and libnuma1
    except (ImportError, OSError) as e:
        return (f"the mooncake package cannot be imported ({e}; scripts/setup.sh installs it)",
                os.environ.get("HOSTCACHE_REQUIRE_STORE") == "1")
    problem = netns_problem()
    if problem:
        return (f"the store tests run in a private network namespace: {problem}",
                os.environ.get("HOSTCACHE_REQUIRE_NETNS") == "1")
    return "", False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Cluster:
    def __init__(self, logs: Path, node_bytes: str = "256 MB"):
        self.logs, self.procs = logs, []
        self.master, self.meta, self.node = free_port(), free_port(), free_port()
        try:
            self._start("master", ["mooncake_master", f"--rpc_port={self.master}",
                                   "--enable_http_metadata_server=false"])
            self._start("metadata", ["mooncake_http_metadata_server", "--host", "127.0.0.1", "--port",
                                     str(self.meta), "--log-level", "WARNING"])
            self._wait(lambda: _listening(self.master) and self._metadata_up(), "master and metadata server")
            self.start_node(node_bytes)
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        env = dict(os.environ, MC_TCP_BIND_ADDRESS="127.0.0.1")
        proc = subprocess.Popen(cmd, stdout=open(self.logs / f"{name}.log", "w"), stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_node(self, node_bytes: str = "256 MB") -> subprocess.Popen:
        """A storage node: the memory objects are placed in, outliving their writers."""
        self.node_proc = self._start("node", [
            "mooncake_client", f"--master_server_address=127.0.0.1:{self.master}",
            f"--metadata_server={self.metadata_url}", f"--global_segment_size={node_bytes}", "--host=127.0.0.1",
            f"--port={self.node}", "--protocol=tcp"])
        self._wait(lambda: _listening(self.node), "storage node")
        return self.node_proc

    @property
    def metadata_url(self) -> str:
        return f"http://127.0.0.1:{self.meta}/metadata"

    def _metadata_up(self) -> bool:
        try:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{self.meta}/metadata?key=probe", timeout=1)
        except urllib.error.HTTPError:
            return True  # it answered
        except OSError:
            return False
        return True

    def _wait(self, ready, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what} not up ({'exited: ' + ', '.join(dead) if dead else 'timeout'}); logs in "
                                   f"{self.logs}")
            time.sleep(0.1)

    def config(self, path: Path, **extra) -> Path:
        """The JSON file a client reads (lmdeploy_hostcache.mooncake_store.StoreConfig)."""
        path.write_text(json.dumps({"metadata_server": self.metadata_url,
                                    "master_server_address": f"127.0.0.1:{self.master}", "protocol": "tcp",
                                    "device_name": "", "global_segment_size": 0, "local_buffer_size": "64MB",
                                    **extra}))
        return path

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)  # a test may have stopped it
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
