"""How often this engine's ended turns are continued by a later prompt: what
write_through_selective (scheduler_tier.py, module docstring) asks before it
saves a block the GPU trie evicts.

A turn ends when its sequence goes from RUNNING to STOPPED. It is continued
when a later admission's prompt holds the chain key of its last full block
(LMDeploy's server: every turn a new session resending the conversation),
or when the same sequence is admitted again (a session kept open). The rate
is decayed, so that a workload that changes is followed, and it is
optimistic until WARMUP turns ended, so that the first conversations' first
turns are kept: they end before any of them can have been continued.
"""
from __future__ import annotations

from typing import Iterable, Optional

WARMUP = 64
THRESHOLD = 0.25  # chat continues most turns; one-off requests none
DECAY = 1.0 - 1.0 / 4096


class Continuations:
    def __init__(self, cap: int):
        self.cap = cap
        self._ends: dict[int, None] = {}       # chain key of an ended turn's last full block, oldest first
        self._open: dict[int, Optional[int]] = {}  # seq_id whose turn ended -> that turn's key
        self.turns = 0.0                       # decayed count of ended turns
        self.continued = 0.0                   # decayed count of those continued
        self.seen = 0

    def ended(self, seq_id: int, last_key: Optional[int]) -> None:
        self.turns = self.turns * DECAY + 1
        self.continued *= DECAY
        self.seen += 1
        self._open[seq_id] = last_key  # dropped when the sequence comes back or its session ends
        if last_key is not None:
            self._ends.pop(last_key, None)
            self._ends[last_key] = None
            if len(self._ends) > self.cap:
                del self._ends[next(iter(self._ends))]

    def resumed(self, seq_id: int) -> None:
        """seq_id is admitted again: the next turn of a session kept open."""
        if seq_id in self._open:
            self._count(self._open.pop(seq_id))

    def admitted(self, keys: Iterable[int]) -> None:
        """A new sequence's chain keys (the GPU match's last, the host hit's, the rest)."""
        if not self._ends:
            return
        for key in keys:
            if int(key) in self._ends:
                self._count(int(key))
                return

    def _count(self, key: Optional[int]) -> None:
        # One continuation per ended turn, whichever way it is seen first.
        if key is not None:
            if key not in self._ends:
                return
            del self._ends[key]
        self.continued += 1

    def forget(self, seq_id: int) -> None:
        self._open.pop(seq_id, None)

    def rate(self) -> float:
        return self.continued / self.turns if self.turns else 0.0

    def likely(self) -> bool:
        return self.seen < WARMUP or self.rate() >= THRESHOLD

    def reset(self) -> None:
        self._ends.clear()
        self._open.clear()
