"""Test-only fault injection into a rank's host pool: HOSTCACHE_FAULTS.

Off unless the variable is set; only tests set it (tests/engine/test_engine_faults.py,
tests/lmdeploy/test_faults.py, the soak). A comma-separated list of KIND=N:
the Nth, 2Nth, ... event of that kind in the process fails, so a run that
fails can be run again the same way; `slow=S` adds S seconds to every copy.
`copy` is a host-side stand-in for a copy that fails after it was queued,
which on a GPU is a device fault: a CUDA rank refuses it.

  build            the pool's memory cannot be allocated when a rank builds it
  chunk            a copy is refused before it is queued: its host chunk could not be pinned or allocated
  queue            the copy engine refuses to queue a copy
  copy             a copy fails after it was queued: it reports an error and its destination holds garbage
  corrupt          a saved slot's bytes change after its save completed (memory going bad): only
                   verification (host_cache_verify) can see it
  corrupt_restore  a restored block changes after its copy landed: only verification can see it
  slow             every copy takes S seconds longer

What each one costs, and which part of the tier handles it:
docs/lmdeploy_integration.md, "Failures".
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

import numpy as np

VARIABLE = "HOSTCACHE_FAULTS"
KINDS: tuple[str, ...] = ("build", "chunk", "queue", "copy", "corrupt", "corrupt_restore", "slow")
USAGE = (f"{VARIABLE} takes KIND=N[,KIND=N...] (the Nth, 2Nth, ... event fails; N an integer >= 1) with KIND one "
         f"of {', '.join(k for k in KINDS if k != 'slow')}, and slow=SECONDS (>= 0)")


def parse(text: str) -> dict[str, float]:
    """{kind: every N events (or seconds for slow)}; ValueError naming the variable for anything else."""
    spec: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, sep, value = item.partition("=")
        kind = kind.strip()
        if not sep or kind not in KINDS:
            raise ValueError(f"{VARIABLE}={text!r}: {item!r} is not KIND=N; {USAGE}")
        try:
            number = float(value) if kind == "slow" else int(value)
        except ValueError:
            number = -1
        if not number >= (0 if kind == "slow" else 1) or number == float("inf"):
            raise ValueError(f"{VARIABLE}={text!r}: {item!r} has a bad count; {USAGE}")
        spec[kind] = number
    return spec


class FaultPlan:
    """Which events fail on this rank (counted per kind)."""

    def __init__(self, spec: dict[str, float]):
        self.every = {k: int(v) for k, v in spec.items() if k != "slow"}
        self.delay = float(spec.get("slow", 0.0))
        self.seen: dict[str, int] = {}
        self.fired: dict[str, int] = {}

    def fires(self, kind: str) -> bool:
        n = self.every.get(kind)
        if not n:
            return False
        self.seen[kind] = self.seen.get(kind, 0) + 1
        if self.seen[kind] % n:
            return False
        self.fired[kind] = self.fired.get(kind, 0) + 1
        return True


_PLANS: dict[str, FaultPlan] = {}  # one per spec in a process: counts go on across pools built again


def from_env() -> Optional[FaultPlan]:
    text = os.environ.get("HOSTCACHE_FAULTS", "")
    if not text.strip():
        return None
    if text not in _PLANS:
        _PLANS[text] = FaultPlan(parse(text))
    return _PLANS[text]


def before_build() -> None:
    """Where a rank builds its pool: `build` strikes here."""
    plan = from_env()
    if plan is not None and plan.fires("build"):
        raise RuntimeError(f"injected fault ({VARIABLE}): the host pool's memory could not be allocated")


def inject(worker: Any, scribble_block: Callable[[int], None]) -> None:
    """A rank's store with the plan's faults (rank_tier.build_worker_tier, once its pool is calibrated)."""
    plan = from_env()
    if plan is None:
        return
    if worker.cuda and plan.every.get("copy"):
        raise ValueError(f"{VARIABLE}: copy=N is a host-side stand-in for a failed copy, which on a GPU is a "
                         "device fault; leave it out on a GPU")
    store = FaultyStore(worker.store, plan, scribble_block)
    worker.store = store
    worker.ledger._on_saved = store.after_save


class _Refused:
    """A copy the engine did not queue (as StoreTransfer reports one)."""

    def __init__(self, direction: str, num_blocks: int, why: str):
        self.direction, self.num_blocks, self._why = direction, num_blocks, why

    def done(self) -> bool:
        return True

    def wait(self) -> bool:
        return False

    @property
    def error(self) -> str:
        return self._why

    def queue_error(self) -> str:
        return self._why

    def wait_on_stream(self, stream: Any) -> None:
        pass


class _Injected:
    """A queued copy with a fault applied when it is first seen complete."""

    def __init__(self, inner: Any, on_done: Optional[Callable[[], None]], error: str, delay: float):
        self._inner, self._on_done, self._error = inner, on_done, error
        self.direction, self.num_blocks = inner.direction, inner.num_blocks
        self._ready_at = time.monotonic() + delay

    def _settle(self) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()

    def done(self) -> bool:
        if not self._inner.done() or time.monotonic() < self._ready_at:
            return False
        self._settle()
        return True

    def wait(self) -> bool:
        ok = self._inner.wait()
        time.sleep(max(0.0, self._ready_at - time.monotonic()))
        self._settle()
        return ok and not self._error

    @property
    def error(self) -> str:
        return (self._inner.error or self._error) if self.done() else ""

    def queue_error(self) -> str:
        return self._inner.queue_error()

    def wait_on_stream(self, stream: Any) -> None:
        self._inner.wait_on_stream(stream)  # CUDA: the fault itself is host-side, for the CPU tests


class FaultyStore:
    """A rank's SlotStore with the plan's faults in its copies; everything
    else is the store's. `scribble_block(block)` overwrites a device block
    (the rank's FallbackCopier knows the pools)."""

    def __init__(self, store: Any, plan: FaultPlan, scribble_block: Callable[[int], None]):
        self._store, self.plan, self._scribble_block = store, plan, scribble_block

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def scribble_slot(self, slot: int) -> None:
        view = np.frombuffer(self._store.slot_view(int(slot)), dtype=np.uint8)
        view ^= 0xFF

    def offload(self, slots: Any, device_blocks: Any, after_stream: Any = None) -> Any:
        return self._submit("offload", slots, device_blocks, after_stream)

    def restore(self, slots: Any, device_blocks: Any, after_stream: Any = None) -> Any:
        return self._submit("restore", slots, device_blocks, after_stream)

    def _submit(self, direction: str, slots: Any, blocks: Any, after_stream: Any) -> Any:
        slots, blocks = np.asarray(slots).reshape(-1), np.asarray(blocks).reshape(-1)
        if self.plan.fires("chunk"):
            raise RuntimeError(f"injected fault ({VARIABLE}): the host chunk of slot {int(slots[0])} could not be "
                               "pinned or allocated")
        if self.plan.fires("queue"):
            return _Refused(direction, len(slots), f"injected fault ({VARIABLE}): the copy engine did not queue "
                                                   f"this {direction}")
        inner = getattr(self._store, direction)(slots, blocks, after_stream=after_stream)
        on_done, error = None, ""
        if self.plan.fires("copy"):
            error = f"injected fault ({VARIABLE}): this {direction} failed after it was queued"
            if direction == "offload":
                on_done = lambda: [self.scribble_slot(s) for s in slots.tolist()]  # noqa: E731
            else:
                on_done = lambda: [self._scribble_block(b) for b in blocks.tolist()]  # noqa: E731
        elif direction == "restore" and self.plan.fires("corrupt_restore"):
            on_done = lambda: self._scribble_block(int(blocks[0]))  # noqa: E731
        if on_done is None and not self.plan.delay:
            return inner
        return _Injected(inner, on_done, error, self.plan.delay)

    def after_save(self, slots: np.ndarray) -> None:
        """A save into `slots` was seen complete (and checksummed): `corrupt` strikes now."""
        if len(slots) and self.plan.fires("corrupt"):
            self.scribble_slot(int(slots[0]))
