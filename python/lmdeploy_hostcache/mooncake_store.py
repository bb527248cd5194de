"""Mooncake Store behind the host pool: whole host slots put to and got from
a Mooncake Store in place, by key.

Transport only: which blocks to put, under which keys, and when, is the
caller's (the LMDeploy integration). The pool's memory is registered with
the store once (SlotStore.memory_ranges: chunks that no longer move), and
a put or a get names slot addresses, so no byte is copied through Python.

Everything the store answers is checked: a get counts as a hit only when it
returned exactly the slot's size (a smaller object returns its own size; a
missing key -704), a put only when it returned 0. A store that cannot be
reached raises at connection with the addresses it tried; after that a
failed call is a miss or an unsaved block for the caller, never data.

The configuration is the JSON file LMDeploy's own Mooncake connector reads
(lmdeploy/pytorch/kv_connector/mooncake/store/data.py): metadata_server,
master_server_address, protocol (tcp or rdma), device_name,
global_segment_size and local_buffer_size (bytes, or "1GB"-style sizes),
plus local_hostname (default: this machine's address) and, ours,
lookup_budget_ms (how long a match waits for the store). global_segment_size is what this
process contributes to the store: 0 keeps the objects on the storage nodes
(`mooncake_client`), where they outlive the engine.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

_SIZE = re.compile(r"^\s*(\d*\.?\d+)\s*([kmg]?b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}


def _size(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: {key} must be a number of bytes or a size like \"512MB\"; got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"{where}: {key} must be a number of bytes or a size like \"512MB\"; got {value!r}")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    if n < 0:
        raise ValueError(f"{where}: {key} must be >= 0; got {value!r}")
    return n


PROBE_TIMEOUT_S = 3.0
# A master that accepts connections but does not answer (stopped,
# overloaded) holds Mooncake's setup for minutes, with the GIL held: a thread
# cannot bound it, so a client in a child process tries first.
SETUP_TIMEOUT_S = 20.0
_PROBE = """
import sys
from mooncake.store import MooncakeDistributedStore
s = MooncakeDistributedStore()
rc = s.setup(*sys.argv[1:3], 0, 16 << 20, *sys.argv[3:7])
s.close()
sys.exit(0 if rc == 0 else 3)
"""


def _setup_answers(hostname: str, config: "StoreConfig") -> Optional[str]:
    """None when a throw-away client in a child process sets up within
    SETUP_TIMEOUT_S (it contributes no memory), else why not."""
    argv = [sys.executable, "-c", _PROBE, hostname, config.metadata_server, config.protocol, config.device_name,
            config.master_server_address]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=SETUP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"setup did not finish within {SETUP_TIMEOUT_S:g} s"
    except OSError as e:
        return f"a probe client could not be started ({e})"
    return None if done.returncode == 0 else f"setup failed (exit {done.returncode})"


def _reachable(name: str, address: str) -> None:
    """A TCP connection to host:port opens within PROBE_TIMEOUT_S, or ConnectionError names `name`."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ConnectionError(f"{name} {address!r} is not host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise ConnectionError(f"{name} {address} cannot be reached ({e.strerror or e})") from None


@contextlib.contextmanager
def _python_signal_handlers():
    """Mooncake's client may install its own SIGINT/SIGTERM/SIGHUP handlers in
    setup; the process is the engine's (or the API server's), whose own
    handlers must keep deciding how it stops. Re-installed from the main
    thread only (the only one Python lets set them)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, handler in before.items():
                if handler is not None:
                    signal.signal(s, handler)


@dataclass(frozen=True)
class StoreConfig:
    metadata_server: str
    master_server_address: str
    protocol: str = "rdma"  # LMDeploy's default
    device_name: str = ""
    global_segment_size: int = 0
    local_buffer_size: int = 64 << 20
    local_hostname: str = ""  # empty: this machine's address (what other clients reach it at)
    # Not LMDeploy's: how long a match may wait for the store (lookup and
    # fetch together) before the rest of the prefix counts as a miss.
    lookup_budget_ms: float = 100.0

    @classmethod
    def from_file(cls, path: str) -> "StoreConfig":
        """The JSON file; errors name the file and the key to change."""
        where = f"Mooncake config {path!r}"
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except OSError as e:
            raise ValueError(f"{where}: cannot be read ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: is not JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: must be a JSON object")
        for key in ("metadata_server", "master_server_address"):
            if not isinstance(raw.get(key), str) or not raw[key].strip():
                raise ValueError(f"{where}: {key} must be a non-empty string")
        protocol = raw.get("protocol", "rdma")
        if protocol not in ("tcp", "rdma"):
            raise ValueError(f"{where}: protocol must be \"tcp\" or \"rdma\"; got {protocol!r}")
        for key in ("device_name", "local_hostname"):
            if key in raw and not isinstance(raw[key], str):
                raise ValueError(f"{where}: {key} must be a string")
        budget = raw.get("lookup_budget_ms", 100.0)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 60_000:
            raise ValueError(f"{where}: lookup_budget_ms must be a number of milliseconds in (0, 60000]; "
                             f"got {budget!r}")
        return cls(metadata_server=raw["metadata_server"], master_server_address=raw["master_server_address"],
                   protocol=protocol, device_name=raw.get("device_name", ""),
                   global_segment_size=_size(raw.get("global_segment_size", 0), "global_segment_size", where),
                   local_buffer_size=_size(raw.get("local_buffer_size", 64 << 20), "local_buffer_size", where),
                   local_hostname=raw.get("local_hostname", ""), lookup_budget_ms=float(budget))


# Answers of the store (Mooncake's ErrorCode) that callers tell apart.
MISSING = -704  # no object under the key: a plain miss
FULL = -200     # no room: the store is evicting


class MooncakeStore:
    """One client of a Mooncake Store, with slot-addressed batch calls."""

    def __init__(self, config: StoreConfig):
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as e:
            raise ImportError("the Mooncake Store tier needs the mooncake package: pip install "
                              "mooncake-transfer-engine (or mooncake-transfer-engine-non-cuda on machines "
                              f"without CUDA), and Debian's libibverbs1 ({e})") from e
        hostname = config.local_hostname or socket.gethostbyname(socket.gethostname())
        if config.protocol == "tcp" and hostname in ("127.0.0.1", "localhost"):
            # Mooncake's TCP transport binds where this says (loopback-only hosts and tests); process-wide
            os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")
        self.config = config
        self._registered: list[tuple[int, int]] = []
        self._store = None
        # Mooncake's setup retries an unreachable master for about 90 s: refused quickly here instead.
        _reachable("master_server_address", config.master_server_address)
        if config.metadata_server.startswith(("http://", "https://", "etcd://", "redis://")):
            _reachable("metadata_server", config.metadata_server.split("://", 1)[1].split("/", 1)[0])
        why = _setup_answers(hostname, config)
        if why is not None:
            raise ConnectionError(f"Mooncake Store {why}: master {config.master_server_address}, metadata server "
                                  f"{config.metadata_server}")
        self._store = MooncakeDistributedStore()
        with _python_signal_handlers():
            rc = self._store.setup(hostname, config.metadata_server, config.global_segment_size,
                                   config.local_buffer_size, config.protocol, config.device_name,
                                   config.master_server_address)
        if rc != 0:
            self.close()
            raise ConnectionError(f"Mooncake Store setup failed (code {rc}): master {config.master_server_address}, "
                                  f"metadata server {config.metadata_server}, protocol {config.protocol}, "
                                  f"this host {hostname}")

    def register(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Host memory the store may read and write in place (SlotStore.memory_ranges)."""
        for ptr, nbytes in ranges:
            rc = self._store.register_buffer(int(ptr), int(nbytes))
            if rc != 0:
                raise RuntimeError(f"Mooncake Store refused to register {nbytes} bytes of the host pool (code {rc})")
            self._registered.append((int(ptr), int(nbytes)))

    def unregister(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Before that memory goes (a pool dropped at sleep or close)."""
        for ptr, nbytes in ranges:
            if (int(ptr), int(nbytes)) in self._registered:
                self._registered.remove((int(ptr), int(nbytes)))
                self._store.unregister_buffer(int(ptr))

    def exists_codes(self, keys: Sequence[str]) -> list[int]:
        """Per key: 1 held, 0 not held, < 0 the store's error code."""
        return [int(r) for r in self._store.batch_is_exist(list(keys))] if keys else []

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Which keys the store holds (an error answer counts as absent)."""
        return [r == 1 for r in self.exists_codes(keys)]

    def put_codes(self, keys: Sequence[str], addrs: Sequence[int], size: int) -> list[int]:
        """Per key: 0 stored, else the store's error code (FULL: no room while it evicts)."""
        if not keys:
            return []
        return [int(c) for c in self._store.batch_put_from(list(keys), [int(a) for a in addrs],
                                                           [int(size)] * len(keys))]

    def put(self, keys: Sequence[str], addrs: Sequence[int], size: int) -> list[bool]:
        """Each slot's `size` bytes at addrs[i] stored under keys[i]; which were."""
        return [c == 0 for c in self.put_codes(keys, addrs, size)]

    def get_codes(self, keys: Sequence[str], addrs: Sequence[int], size: int) -> list[int]:
        """Per key: the object's size when it was read (a hit only when it is
        `size`: a smaller object returns its own size), else the store's
        error code (MISSING: no such key)."""
        if not keys:
            return []
        return [int(g) for g in self._store.batch_get_into(list(keys), [int(a) for a in addrs],
                                                           [int(size)] * len(keys))]

    def get(self, keys: Sequence[str], addrs: Sequence[int], size: int) -> list[bool]:
        """keys[i]'s object into the slot at addrs[i]; a hit only where it was
        exactly `size` bytes (anything else: a miss, and the slot's bytes are
        not to be used)."""
        return [g == size for g in self.get_codes(keys, addrs, size)]

    def remove(self, key: str) -> bool:
        return self._store.remove(key) == 0

    def close(self) -> None:
        store, self._store = self._store, None
        if store is None:
            return
        try:
            for ptr, _ in self._registered:
                store.unregister_buffer(ptr)
        finally:
            self._registered = []
            store.close()
