"""What one rank knows of the bytes in its host slots, shared with the
scheduler in the same process.

The scheduler settles a save the moment it plans it (tier_index.h): a slot
is matchable before its copy ran, which is right while copies succeed. The
ledger is what keeps that right when one fails, and what verification
(host_cache_verify) reads:

- per slot, how many saves the scheduler planned into it and how many this
  rank carried out (queued, or copied by the fallback path): a slot whose
  latest save has not reached the rank holds older bytes;
- the saves not yet seen complete, with their source blocks: on CPU copies,
  one that failed after it was queued is redone from its block before
  anything reads the slot or overwrites the block (the order is argued once,
  in rank_tier.WorkerTier.before_model); on a GPU such a failure is a device
  fault and is raised;
- which slots hold no good bytes because their latest save failed on both
  paths or was skipped (`failed`): a rank never restores from one;
- with verification on, each slot's checksum (the core's XXH64), taken from
  the slot when its save is seen complete: a later mismatch means the bytes
  changed in host memory;
- whether the pool became unusable (`lost`): both copy paths failed, or it
  could not be built again after a sleep;
- with a store behind the pool (store_tier.py), the restores planned from
  each slot and those the rank queued and saw complete: a slot is filled
  from the store only while no copy of this rank is planned or running on
  it (`quiet`), and put to the store only once its latest save completed
  (`confirmed`); a slot the store filled is `filled`.

The scheduler side asks `check` before it pins a host hit
(scheduler_tier.HostTier.continue_match) and marks `planned` saves; the rank
side (rank_tier.WorkerTier) records what it queued and settles. Ledgers are
found by the id of the engine's cache config, as rank_tier's figures are:
only ranks in the scheduler's process have one it can read.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Optional

import numpy as np

# check() outcomes for the first slot that cannot be served
UNCONFIRMED = "unconfirmed"  # verification on: its save has not completed (or not reached the rank) yet
UNKNOWN = "unknown"          # the ledger never heard of the slot: its store was built again under a kept index
MISMATCH = "mismatch"        # verification on: its bytes no longer match their checksum
LOST = "lost"                # the pool is unusable


class SlotLedger:
    def __init__(self, num_slots: int, verify: bool, checksum: Callable[[int], int],
                 repair: Callable[[np.ndarray, np.ndarray], None],
                 on_saved: Optional[Callable[[np.ndarray], None]] = None, cuda: bool = False):
        self.verify = verify
        # A GPU orders copies on the device, not by settling on the host: a
        # failed save's block may be overwritten before the host sees the
        # failure, and waiting for a save would stall the scheduler.
        self.cuda = cuda
        self._checksum = checksum  # slot -> XXH64 of its bytes
        self._repair = repair      # (slots, blocks): redo saves by another path; raises if it cannot
        self._on_saved = on_saved  # (slots): saves seen complete (test-only faults strike here)
        self._planned = np.zeros(num_slots, dtype=np.int64)
        self._carried = np.zeros(num_slots, dtype=np.int64)
        self._sums = np.zeros(num_slots, dtype=np.uint64)
        self._summed = np.zeros(num_slots, dtype=bool)  # _sums holds the latest save's bytes
        self._failed = np.zeros(num_slots, dtype=bool)  # the latest save left no good bytes
        # (transfer, slots, blocks, each slot's save count with this save): saves not yet seen complete
        self._in_flight: list[tuple[Any, np.ndarray, np.ndarray, np.ndarray]] = []
        self.lost: Optional[str] = None
        self.watched = False  # a scheduler in this process reads this ledger
        self.counts = {"copy_failures": 0, "copies_redone": 0, "restore_mismatches": 0}
        self._restores_planned = np.zeros(num_slots, dtype=np.int64)
        self._restores_queued = np.zeros(num_slots, dtype=np.int64)
        self._restoring: list[tuple[Any, np.ndarray]] = []  # (transfer, slots) restores not yet seen complete
        # Re-entrant: the scheduler's check() settles saves, which may run the
        # rank's repair (and its waits) from inside the lock.
        self._lock = threading.RLock()

    @staticmethod
    def unusable(reason: str) -> "SlotLedger":
        """The ledger of a rank whose pool could not be built."""
        ledger = SlotLedger(0, False, lambda s: 0, lambda s, b: None)
        ledger.lost = reason
        return ledger

    # ----- scheduler side

    def planned(self, slot: int) -> None:
        with self._lock:
            if slot < len(self._planned):
                self._planned[slot] += 1

    def planned_restore(self, slots: np.ndarray) -> None:
        with self._lock:
            np.add.at(self._restores_planned, np.asarray(slots, dtype=np.int64), 1)

    def _settled(self) -> bool:
        """Saves seen complete are settled, without waiting; False when the
        pool is lost (or a device fault loses it now): nothing is usable."""
        if self.lost:
            return False
        try:
            self.settle()
        except RuntimeError:
            return False
        return not self.lost

    def _prune_restoring(self) -> None:
        self._restoring = [(t, s) for t, s in self._restoring if not t.done()]

    @staticmethod
    def _outside(slots: np.ndarray, copies: list) -> np.ndarray:
        """Which of `slots` none of `copies` ((transfer, slots, ...) tuples) touches."""
        touched = {int(x) for c in copies for x in c[1].tolist()}
        return ~np.isin(slots, list(touched)) if touched else np.ones(len(slots), dtype=bool)

    def quiet(self, slots: np.ndarray) -> np.ndarray:
        """Which of `slots` no copy of this rank reads or writes, planned and
        not yet queued, or queued and not yet complete: another writer (the
        store) may fill those now. Never waits."""
        with self._lock:
            slots = np.asarray(slots, dtype=np.int64)
            if not len(slots) or not self._settled():
                return np.zeros(len(slots), dtype=bool)
            self._prune_restoring()
            return ((self._carried[slots] == self._planned[slots])
                    & (self._restores_queued[slots] == self._restores_planned[slots])
                    & self._outside(slots, self._restoring) & self._outside(slots, self._in_flight))

    def confirmed(self, slots: np.ndarray) -> np.ndarray:
        """Which of `slots` hold the bytes of their latest planned save, seen
        complete (with verification: checksummed, and still matching it):
        what may be put to the store. Never waits."""
        with self._lock:
            slots = np.asarray(slots, dtype=np.int64)
            if not self._settled():
                return np.zeros(len(slots), dtype=bool)
            ok = ((self._carried[slots] >= self._planned[slots]) & (self._carried[slots] > 0) & ~self._failed[slots]
                  & self._outside(slots, self._in_flight))
            if self.verify:  # the store keeps no checksum: bytes that changed here must not leave
                ok &= self._summed[slots]
                for i in np.nonzero(ok)[0].tolist():
                    ok[i] = self._checksum(int(slots[i])) == int(self._sums[slots[i]])
            return ok

    def filled(self, slots: np.ndarray) -> None:
        """The store wrote good bytes (exactly a slot's size) into `slots`."""
        with self._lock:
            slots = np.asarray(slots, dtype=np.int64)
            np.add.at(self._planned, slots, 1)
            np.add.at(self._carried, slots, 1)
            self._finished(slots)

    def check(self, slots: np.ndarray) -> tuple[int, str]:
        """How many of `slots` (a matched prefix, in order) can be restored
        as they are, and why the next one cannot ('' when all can). With
        verification on, waits for saves into them that are in flight."""
        with self._lock:
            if self.lost:
                return 0, LOST
            if not len(slots):
                return 0, ""
            slots = np.asarray(slots)
            # A slot this ledger never heard of holds nothing: a store built
            # again under an index that was kept (a rebuild without a sleep).
            unknown = np.nonzero((self._planned[slots] == 0) & (self._carried[slots] == 0))[0]
            first = int(unknown[0]) if len(unknown) else len(slots)
            if not self.verify:
                return first, UNKNOWN if first < len(slots) else ""
            try:
                self.settle(wait_for=None if self.cuda else slots)
            except RuntimeError:  # a device fault: lost; the rank raises it at its next forward
                return 0, LOST
            if self.lost:
                return 0, LOST
            for i, s in enumerate(slots[:first].tolist()):
                if self._carried[s] < self._planned[s] or not self._summed[s]:
                    return i, UNCONFIRMED
                if self._checksum(s) != int(self._sums[s]):
                    return i, MISMATCH
            return first, UNKNOWN if first < len(slots) else ""

    def unservable(self, slots: np.ndarray) -> Optional[str]:
        """Why a restore from `slots` cannot be carried out, or None: one's
        latest save left no good bytes (both copy paths failed, or it was
        skipped once the pool was lost) after the scheduler matched it, or
        none ever reached this store."""
        with self._lock:
            slots = np.asarray(slots)
            bad = slots[self._failed[slots]]
            if len(bad):
                return f"host slot {int(bad[0])} holds no saved bytes ({self.lost or 'its save failed'})"
            # A save always reaches a rank before a restore of its slot does:
            # a slot this store never saved into was filled in another store
            # (one built again, with ranks in another process than the scheduler).
            never = slots[self._carried[slots] == 0]
            if len(never):
                return f"host slot {int(never[0])} was never saved into by this rank's store"
            return None

    # ----- rank side

    def submitted(self, transfer: Any, slots: np.ndarray, blocks: np.ndarray) -> None:
        """A save from `blocks` into `slots` was queued."""
        with self._lock:
            np.add.at(self._carried, slots, 1)
            self._summed[slots] = False
            self._failed[slots] = False
            self._in_flight.append((transfer, slots, blocks, self._carried[slots].copy()))

    def restoring(self, transfer: Any, slots: np.ndarray) -> None:
        """A restore from `slots` was queued (transfer) or made (None: the fallback path)."""
        with self._lock:
            slots = np.asarray(slots, dtype=np.int64)
            np.add.at(self._restores_queued, slots, 1)
            self._prune_restoring()  # a bound, without quiet() calls
            if transfer is not None:
                self._restoring.append((transfer, slots))

    def copied(self, slots: np.ndarray) -> None:
        """A save into `slots` finished on the fallback path."""
        with self._lock:
            np.add.at(self._carried, slots, 1)
            self._finished(slots)

    def skipped(self, slots: np.ndarray) -> None:
        """Saves into `slots` the rank did not make (its pool is lost)."""
        with self._lock:
            np.add.at(self._carried, slots, 1)
            self._summed[slots] = False
            self._failed[slots] = True

    def settle(self, wait_for: Any = None, wait_blocks: Any = None, wait_all: bool = False) -> None:
        """Saves seen complete: checksummed, or redone when they failed.
        Waits for those writing a slot of `wait_for`, reading a block of
        `wait_blocks`, or for all."""
        with self._lock:
            slots_wanted = set(np.asarray(wait_for).tolist()) if wait_for is not None else set()
            blocks_wanted = set(np.asarray(wait_blocks).tolist()) if wait_blocks is not None else set()
            flights, self._in_flight = self._in_flight, []
            for i, (transfer, slots, blocks, gens) in enumerate(flights):
                must = (wait_all or not slots_wanted.isdisjoint(slots.tolist())
                        or not blocks_wanted.isdisjoint(blocks.tolist()))
                if not must and not transfer.done():
                    self._in_flight.append(flights[i])
                    continue
                # The latest save into a slot owns it: an older one that failed is not redone over it.
                latest = self._carried[slots] == gens
                if not transfer.wait():
                    self.counts["copy_failures"] += 1
                    if self.cuda:
                        self._in_flight += flights[i + 1:]  # not looked at: they stay in flight
                        self._failed[slots] = True
                        self.lose(f"a save failed on the device ({transfer.error})")
                        raise RuntimeError(f"lmdeploy-hostcache: a host-cache save failed on the device "
                                           f"({transfer.error}): a device fault")
                    if latest.any():
                        self.redo(slots[latest], blocks[latest], transfer.error)
                elif latest.any():
                    self._finished(slots[latest])

    def redo(self, slots: np.ndarray, blocks: np.ndarray, why: str) -> None:
        """A save failed (`why`): copies it again by the fallback path, or
        loses the pool when that fails too."""
        with self._lock:
            try:
                self._repair(slots, blocks)
            except Exception as e:  # noqa: BLE001 - both paths failed: the pool is unusable
                self.lose(f"a save failed ({why}) and so did its copy by the fallback path ({e})")
                self._summed[slots] = False
                self._failed[slots] = True
                return
            self.counts["copies_redone"] += 1
            self._finished(slots)

    def transfers(self) -> list[Any]:
        """The saves in flight (to wait for, without settling them)."""
        with self._lock:
            return [f[0] for f in self._in_flight]

    def expected(self, slot: int) -> Optional[int]:
        """The checksum the slot's bytes had when saved, if taken."""
        with self._lock:
            return int(self._sums[slot]) if self._summed[slot] else None

    def lose(self, reason: str) -> None:
        with self._lock:
            if self.lost is None:
                self.lost = reason

    def _finished(self, slots: np.ndarray) -> None:
        self._failed[slots] = False
        if self.verify:
            for s in np.asarray(slots).tolist():
                self._sums[s] = self._checksum(s)
            self._summed[slots] = True
        if self._on_saved is not None:
            self._on_saved(slots)


# ----- the ledgers of the ranks in this process, by the id of their engine's cache config
# (weakly: a ledger lives as long as its rank's WorkerTier, or the agent whose pool failed)

_LEDGERS: dict[int, "weakref.WeakSet[SlotLedger]"] = {}


def register(config_id: int, ledger: SlotLedger) -> None:
    _LEDGERS.setdefault(config_id, weakref.WeakSet()).add(ledger)


def unregister(ledger: SlotLedger) -> None:
    for key, found in list(_LEDGERS.items()):
        found.discard(ledger)
        if not found:
            del _LEDGERS[key]


def ledgers(config_id: int) -> list[SlotLedger]:
    return list(_LEDGERS.get(config_id, ()))
