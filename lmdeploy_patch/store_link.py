"""One rank's link to a Mooncake Store: its client, the threads its calls
run on, and what it does when the store misbehaves. Built by the rank with
its host pool (rank_tier.py), driven by the scheduler side (store_tier.py)
in the same process; found by the id of the engine's cache config, as the
ranks' ledgers are (slot_ledger.py).

Threads. A store call blocks; none runs on the scheduler's or the
forward's thread. Lookups and fetches go to one thread, puts to another,
so a backlog of saves never delays a match; the scheduler waits for a
lookup or a fetch only up to its budget (store_tier.py), and whatever has
not answered by then is a miss. Mooncake releases the GIL while it waits.

Failures. Every answer is classified: a missing key is a plain miss; an
object of another size, a failed transfer, a full store, an error code or
a call past its budget is a failure, counted by kind (FAILURE_KINDS). After
a failure the link is down for a back-off (1 s, doubling to 30 s, reset by
a success): lookups and puts are skipped meanwhile, so a dead store costs
one budget per back-off, not one per match. The first call after it is the
probe; Mooncake's client reconnects to a master or node that came back.
"""
from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Optional

FAILURE_KINDS = ("timeout", "transfer", "size", "full", "error")
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0
# Latency samples kept until the scheduler side reads them (a bound if it never does).
SAMPLES_KEPT = 4096


class _Worker:
    """Runs calls in order on one daemon thread: at exit, the interpreter
    never waits for a call stuck on a dead store (executor threads it joins)."""

    def __init__(self, name: str):
        self._queue: "queue.SimpleQueue[Optional[tuple]]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args: Any) -> Future:
        """After stop(), `fn` runs at once on the caller's thread (the link's
        calls then return without the store): a future always resolves."""
        future: Future = Future()
        with self._lock:
            if not self._stopped:
                self._queue.put((future, fn, args))
                return future
        _resolve(future, fn, args)
        return future

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            _resolve(*job)

    def stop(self) -> None:
        """Calls queued before this still run, then the thread ends."""
        with self._lock:
            self._stopped = True
            self._queue.put(None)

    def join(self, timeout: Optional[float] = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _resolve(future: Future, fn: Callable, args: tuple) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(*args))
    except BaseException as e:  # noqa: BLE001 - handed to whoever waits
        future.set_exception(e)


def new_counts() -> dict[str, int]:
    """What a link counts (StoreTier.metrics sums them over links)."""
    return {"lookups": 0, "lookup_blocks": 0, "found_blocks": 0, "fetched_blocks": 0, "bytes_read": 0,
            "put_blocks": 0, "put_present": 0, "bytes_written": 0, "skipped_down": 0,
            **{f"failures_{k}": 0 for k in FAILURE_KINDS}}


class StoreLink:
    def __init__(self, store: Any, prefix: str, slot_address: Callable[[int], int], slot_bytes: int,
                 keep_alive: Any = None, missing: int = -704, full: int = -200):
        self.store = store            # lmdeploy_hostcache.MooncakeStore, the pool's memory registered
        self.prefix = prefix          # store_keys.key_prefix of this rank
        self.slot_address = slot_address
        self.slot_bytes = slot_bytes
        # The host pool (and, through it, the GPU pools) stays alive while a
        # call still reads or writes its memory, even after the rank dropped it.
        self._keep_alive = keep_alive
        self._missing, self._full = missing, full
        self._gets = _Worker("hostcache-store-get")
        self._puts = _Worker("hostcache-store-put")
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._backoff = BACKOFF_MIN_S
        self.counts = new_counts()
        self.samples: dict[str, deque] = {"lookup": deque(maxlen=SAMPLES_KEPT), "fetch": deque(maxlen=SAMPLES_KEPT),
                                          "put": deque(maxlen=SAMPLES_KEPT)}
        self._closed = False
        self.put_started: Optional[float] = None  # when the put running now began (put_stalled)
        self._stall_seen: Optional[float] = None

    # ----- health

    def up(self) -> bool:
        return not self._closed and time.monotonic() >= self._down_until

    def add(self, name: str, n: int = 1) -> None:
        """Counts are written from the scheduler's thread and the link's own."""
        with self._lock:
            self.counts[name] += n

    def failed(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.counts[f"failures_{kind}"] += n
            self._down_until = time.monotonic() + self._backoff
            self._backoff = min(BACKOFF_MAX_S, self._backoff * 2)

    def _ok(self) -> None:
        with self._lock:
            self._backoff = BACKOFF_MIN_S

    def key(self, digest: bytes) -> str:
        return self.prefix + digest.hex()

    # ----- lookups and fetches (the scheduler waits on the futures, up to its budget)

    def lookup(self, digests: list[bytes]) -> Future:
        """A future of how many of `digests`, from the first, the store holds."""
        self.add("lookups", 1)
        self.add("lookup_blocks", len(digests))
        return self._gets.submit(self._lookup, [self.key(d) for d in digests])

    def _lookup(self, keys: list[str]) -> int:
        if self._closed:
            return 0
        t0 = time.monotonic()
        try:
            codes = self.store.exists_codes(keys)
        except Exception:  # noqa: BLE001 - a store that cannot answer is a miss
            self.failed("error")
            return 0
        if len(codes) != len(keys):
            self.failed("error")
            return 0
        self.samples["lookup"].append(time.monotonic() - t0)
        n = 0
        while n < len(codes) and codes[n] == 1:
            n += 1
        if n < len(codes) and codes[n] < 0:
            self.failed("error")
        else:
            self._ok()
        self.add("found_blocks", n)
        return n

    def fetch(self, digests: list[bytes], slots: list[int]) -> Future:
        """A future of which slots now hold their block's object (exactly
        slot_bytes read); the others hold nothing to use."""
        return self._gets.submit(self._fetch, [self.key(d) for d in digests], list(slots))

    def _fetch(self, keys: list[str], slots: list[int]) -> list[bool]:
        if self._closed:
            return [False] * len(slots)
        t0 = time.monotonic()
        try:
            sizes = self.store.get_codes(keys, [self.slot_address(s) for s in slots], self.slot_bytes)
        except Exception:  # noqa: BLE001
            self.failed("error")
            return [False] * len(slots)
        self.samples["fetch"].append(time.monotonic() - t0)
        if len(sizes) != len(slots):  # not an answer to this call: nothing fetched is trusted
            self.failed("error")
            return [False] * len(slots)
        ok = [size == self.slot_bytes for size in sizes]
        wrong = [size for size in sizes if size != self.slot_bytes and size != self._missing]
        if any(size >= 0 for size in wrong):
            self.failed("size", sum(size >= 0 for size in wrong))
        if any(size < 0 for size in wrong):
            self.failed("transfer", sum(size < 0 for size in wrong))
        if not wrong:
            self._ok()
        self.add("fetched_blocks", sum(ok))
        self.add("bytes_read", sum(ok) * self.slot_bytes)
        return ok

    # ----- puts (in the background; the scheduler collects what finished)

    def put(self, digests: list[bytes], slots: list[int], done: Callable[[list[bool]], None]) -> None:
        """Stores each slot's bytes under its digest's key unless the store
        holds it already; `done(which are in the store now)` on the put thread."""
        self._puts.submit(self._put, [self.key(d) for d in digests], list(slots), done)

    def _put(self, keys: list[str], slots: list[int], done: Callable[[list[bool]], None]) -> None:
        stored = [False] * len(keys)
        try:
            if not self.up():
                self.add("skipped_down", len(keys))
                return
            t0 = self.put_started = time.monotonic()
            held = self.store.exists_codes(keys)
            if len(held) != len(keys):
                self.failed("error")
                return
            todo = [i for i, h in enumerate(held) if h != 1]
            for i, h in enumerate(held):
                stored[i] = h == 1
            self.add("put_present", len(keys) - len(todo))
            if todo:
                codes = self.store.put_codes([keys[i] for i in todo], [self.slot_address(slots[i]) for i in todo],
                                             self.slot_bytes)
                if len(codes) != len(todo):
                    self.failed("error")
                    return
                for i, c in zip(todo, codes):
                    stored[i] = c == 0
                good = sum(c == 0 for c in codes)
                self.add("put_blocks", good)
                self.add("bytes_written", good * self.slot_bytes)
                full = sum(c == self._full for c in codes)
                if full:
                    self.failed("full", full)
                if len(codes) - good - full:
                    self.failed("transfer", len(codes) - good - full)
                if good == len(codes):
                    self._ok()
            self.samples["put"].append(time.monotonic() - t0)
        except Exception:  # noqa: BLE001 - an unsaved block is only a later miss
            self.failed("error")
        finally:
            self.put_started = None
            done(stored)

    def put_stalled(self, limit_s: float) -> bool:
        """Whether the put running now has run longer than `limit_s`; once
        per put it also takes the link down, as a call past its budget does."""
        started = self.put_started
        if started is None or time.monotonic() - started <= limit_s or started == self._stall_seen:
            return False
        self._stall_seen = started
        self.failed("timeout")
        return True

    # ----- shutdown

    def close(self, timeout_s: float = 5.0) -> bool:
        """Stops taking calls and closes the client once those running end;
        waits at most `timeout_s` (a dead store's calls may take longer: the
        client and the memory it reads then stay until they end, on a
        thread of their own). True if it closed in time."""
        self._closed = True
        finished = threading.Event()

        def drain() -> None:
            try:
                self._puts.stop()
                self._gets.stop()
                self._puts.join()
                self._gets.join()
                self.store.close()
            except Exception:  # noqa: BLE001 - closing a broken client: nothing more to do
                pass
            finally:
                self._keep_alive = None
                finished.set()

        threading.Thread(target=drain, name="hostcache-store-close", daemon=True).start()
        return finished.wait(timeout_s)


# ----- the links of the ranks in this process, by the id of their engine's cache config

_LINKS: dict[int, "weakref.WeakSet[StoreLink]"] = {}
# Counts of links dropped with their pools (sleep), by config id: counters never go down.
_RETIRED: dict[int, dict[str, int]] = {}


def register(config_id: int, link: StoreLink) -> None:
    _LINKS.setdefault(config_id, weakref.WeakSet()).add(link)


def unregister(link: StoreLink) -> None:
    for key, found in list(_LINKS.items()):
        if link in found:
            retired = _RETIRED.setdefault(key, {})
            for name, n in link.counts.items():
                retired[name] = retired.get(name, 0) + n
        found.discard(link)
        if not found:
            del _LINKS[key]


def retired_counts(config_id: Optional[int]) -> dict[str, int]:
    return dict(_RETIRED.get(config_id, {})) if config_id is not None else {}


def links(config_id: Optional[int]) -> list[StoreLink]:
    return list(_LINKS.get(config_id, ())) if config_id is not None else []
