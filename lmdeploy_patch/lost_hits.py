"""Lost hits: prompt tokens a GPU prefix cache that never evicts would have
served at an admission and this engine (GPU cache plus host tier) recomputed,
counted by cause. The scheduler side (scheduler_tier.py) reports what it sees;
this file keeps the books and owns the causes.

The never-evicting cache is modelled by a shadow: the keys of every block
this engine attached to its trie (bounded, oldest forgotten first; a
forgotten key is never counted as lost). At an admission, after LMDeploy's
own match and the tier's, the blocks past what was served that the shadow
holds, in an unbroken chain, are the loss, and the first of them names the
cause. Two losses need no shadow: a sequence preempted and admitted again
recomputes what an unbounded cache (which never preempts) would not, and an
open session whose stopped sequence lost its blocks would have kept them,
partial last block included.

Causes (CAUSES):
  never_saved        computed on the GPU, evicted there, never saved to host
                     (the write policy chose not to, or its save was not planned yet)
  save_dropped       its save found no host slot (every slot pinned or an inner node)
  evicted_from_host  saved, then evicted from the host pool (the pool is smaller
                     than the working set)
  partial_block      an open session's partial last block that was not kept
  preempted          recomputed by a sequence the scheduler preempted (recompute
                     eviction), beyond what its re-admission found cached
  recomputed_by_choice  found in host memory, recomputed because that was
                     estimated faster than the copy (restore_decision.py) or
                     host_cache_restore_policy=never

The sum of the counts is the admission-by-admission difference to such a
cache; the replay (benchmark/multiturn.py) checks it against a real run of
one (tier off, a GPU cache that never evicts).
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

CAUSES = ("never_saved", "save_dropped", "evicted_from_host", "partial_block", "preempted", "recomputed_by_choice")
# Three books of Python ints, about 75 bytes a key each: at most ~450 MiB.
SHADOW_KEYS = 1 << 21


def shadow_keys(host_slots: int, gpu_blocks: int) -> int:
    """Keys each book keeps: four times what the engine can hold at once,
    at least 65,536 (about 15 MiB in all) and at most SHADOW_KEYS. A bound on memory, not a model: a block older than
    that is forgotten and its loss goes uncounted (the sum then falls short
    of the gap, never over it)."""
    return max(1 << 16, min(SHADOW_KEYS, 4 * (host_slots + gpu_blocks)))


class LostHits:
    """The books of lost hits of one engine (module docstring)."""

    def __init__(self, shadow_keys: int = SHADOW_KEYS):  # noqa: F811 - the parameter, not the function
        self.shadow_keys = shadow_keys
        self._seen: dict[int, None] = {}     # computed blocks, oldest first
        self._saved: dict[int, None] = {}    # blocks saved at least once, oldest first
        self._dropped: dict[int, None] = {}  # blocks whose save was dropped
        self.tokens: Counter = Counter({c: 0 for c in CAUSES})
        self._pending: dict[int, Counter] = {}  # seq_id -> losses of an admission not yet committed

    @staticmethod
    def _add(book: dict, key: int, cap: int) -> None:
        book.pop(key, None)  # to the young end
        book[key] = None
        if len(book) > cap:
            del book[next(iter(book))]

    def computed(self, key: int) -> None:
        self._add(self._seen, key, self.shadow_keys)

    def saved(self, key: int) -> None:
        self._add(self._saved, key, self.shadow_keys)
        self._dropped.pop(key, None)

    def dropped(self, key: int) -> None:
        self._add(self._dropped, key, self.shadow_keys)

    def cause_of(self, key: int) -> str:
        if key in self._dropped:
            return "save_dropped"
        return "evicted_from_host" if key in self._saved else "never_saved"

    def chain_loss(self, keys: Iterable[int]) -> tuple[int, Optional[str]]:
        """The leading blocks of `keys` (those not served) that the shadow
        holds in an unbroken chain, and the cause of the first of them."""
        lost, cause = 0, None
        for key in keys:
            if int(key) not in self._seen:
                break
            if cause is None:
                cause = self.cause_of(int(key))
            lost += 1
        return lost, cause

    def note(self, seq_id: int, cause: str, tokens: int) -> None:
        """A loss of this admission, counted once the sequence runs (a rolled-back admission counts nothing)."""
        if tokens > 0:
            self._pending.setdefault(seq_id, Counter())[cause] += tokens

    def commit(self, seq_id: int) -> None:
        pending = self._pending.pop(seq_id, None)
        if pending:
            self.tokens.update(pending)

    def rollback(self, seq_id: int) -> None:
        self._pending.pop(seq_id, None)

    def reset(self) -> None:
        """The engine slept: its cache (and so the never-evicting model of it) starts empty."""
        self._seen.clear()
        self._saved.clear()
        self._dropped.clear()
        self._pending.clear()

    def metrics(self) -> dict:
        return {f"host_lost_{cause}_tokens": int(self.tokens[cause]) for cause in CAUSES}
