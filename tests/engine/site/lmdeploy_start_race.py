"""Test support, not product: a workaround for a start-up race in LMDeploy
0.18.0's API server, so that the engine tests do not fail at random.

ZMQMPEngine._start_mp_proc leaves its multiprocessing Manager (shutting it
down) as soon as it has read the engine process's RPC port, while the engine
process may still be waiting for the reply to releasing the Manager's
Condition it used to publish that port. When the Manager goes first, the
engine process dies with EOFError from managers.py before it built
anything, and the server never starts. Seen on a busy 2-core machine in
between 1 start in 10 and 1 in 3, with or without the host tier (the
benchmark's ApiServer retries such a start instead: benchmark/server_client.py).

The fix: the engine process's `with condition:` tolerates a Manager that is
gone on release; the port was published and the parent has read it. Loaded
by sitecustomize.py when HOSTCACHE_TEST_START_RACE=1.
"""
from __future__ import annotations

from typing import Any


class _ReleaseTolerant:
    def __init__(self, condition: Any):
        self._condition = condition

    def __enter__(self):
        return self._condition.__enter__()

    def __exit__(self, *exc):
        try:
            return self._condition.__exit__(*exc)
        except (EOFError, BrokenPipeError, ConnectionError):
            return False

    def __getattr__(self, name: str):
        return getattr(self._condition, name)


def install() -> None:
    from lmdeploy.pytorch.engine.mp_engine import zmq_engine

    cls = zmq_engine.ZMQMPEngine
    original = cls.__dict__["_mp_proc"].__func__

    def _mp_proc(shared_dict, condition, *args, **kwargs):
        return original(shared_dict, _ReleaseTolerant(condition), *args, **kwargs)

    # Spawn pickles the target by qualified name: keep the name, so the
    # engine process (which loads this too) finds this function under it.
    _mp_proc.__qualname__, _mp_proc.__module__ = original.__qualname__, original.__module__
    cls._mp_proc = staticmethod(_mp_proc)
