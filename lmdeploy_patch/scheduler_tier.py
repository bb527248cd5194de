"""The scheduler side of the host tier inside LMDeploy's PyTorch engine.

It holds the tier's index (the core's TierIndex: which host slot holds which
block, and the rules for reserving, settling, pinning and releasing slots,
the same the single-process HostCache keeps) and decides, from the events of
one scheduling pass, the copies that travel with the next forward as a
HostCopyPlan (copy_plan.py). Each rank executes the plan on its own
SlotStore (rank_tier.py).

Each rank's copies run in submission order per slot and per block, so this
side settles a save or a restore the moment it plans it (tier_index.h says
why that is the same rule HostCache applies at completion): a saved block is
matchable as soon as its save is planned, and a slot is free for reuse as
soon as the restore reading it is planned.

State lives here, not on LMDeploy's objects: `tier_of` maps the scheduler,
its trie and its sequence lifecycle to their HostTier, and every trie node
the tier has seen has one NodeRecord (weakly keyed by the node, so a node
LMDeploy drops takes its record with it). Keys: a record's `key` is our
chained XXH64 over (parent key, namespace, token ids), computed when the
node attaches (LMDeploy's own block hash is salted per process). A node with
multimodal identity, or under one, gets None and is neither saved nor
matched. The namespace of a key is the adapter and the request's cache salt
(cache_salt.py). Per-sequence state is keyed by `seq.seq_id`.

Session tails. LMDeploy's trie holds full blocks only; a session between
turns keeps its last, partial block in its own sequence (a STOPPED sequence
keeps its blocks), until the scheduler reclaims them for another request.
The next turn then recomputes that tail, up to block_size - 1 tokens, which a
GPU cache that never evicts would have kept: at 64-token blocks, that was the
whole gap between the tier and such a cache on the multi-turn replay
(benchmark/RESULTS.md). So when a sequence's blocks are released with a
partial tail whose KV is computed, the tail is saved too, as an index entry
under the chain key of its last full block, with its tokens padded by
TAIL_PAD (never a token id, so no full-block match can reach it), and the
session's next match restores it into its fresh block and resumes mid-block.

Write policies (host_cache_write_policy; docs/lmdeploy_integration.md has
the table): write_through saves every full block as it is computed;
write_back saves what the GPU trie evicts; write_through_selective saves
only what has shown it will be reused, each as late as it can:
  - a block the GPU trie served, right after the forward that reused it
    (it is hot: in chat every later turn reuses it again);
  - a block the GPU trie evicts, while this engine's turns are usually
    continued (continuations.py). Only ended or released sequences have
    evictable blocks, so these are blocks of turns that ended.
A workload whose turns are not continued (one-off requests, no reuse)
moves only what the GPU trie served twice; chat moves what write_back
moves, not the blocks the GPU reused before evicting them, nor the last
turns that write_through saves on the chance.

Restore or recompute (host_cache_restore_policy): each host hit is weighed
by the RestoreDecider (restore_decision.py) before it is pinned for a plan.

With a Mooncake Store behind the pool (host_cache_store; store_tier.py,
docs/store_tier.md), records also carry the store's chain digest, saved
blocks are put to the store once their saves completed, and a match that
ends in the host index continues in the store (_continue_in_store).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from lmdeploy_hostcache import ROOT_KEY, _core, as_tokens

from .continuations import Continuations
from .copy_plan import HostCopyPlan
from .eligibility import off_reason, tier_slots, turn_off
from .histogram import SIZE_BOUNDS_BYTES, Histogram
from . import cache_salt, slot_ledger, store_keys
from .log import log_once, logger
from .lost_hits import LostHits, shadow_keys
from .restore_decision import RestoreDecider
from .settings import DEFAULT_RESTORE_POLICY, WRITE_POLICIES, host_cache_requested

_NO_BLOCKS = np.empty(0, dtype=np.int64)
_NO_SLOTS = np.empty(0, dtype=np.uint32)
# Pads a session tail's tokens to a whole block (module docstring): no token id is negative.
TAIL_PAD = -1
# write_through_selective saves a block once the GPU trie has served it this many times.
SELECTIVE_MIN_HITS = 1

_TIERS: "weakref.WeakKeyDictionary[Any, HostTier]" = weakref.WeakKeyDictionary()


def tier_of(owner: Any) -> Optional["HostTier"]:
    """The HostTier of a Scheduler, its BlockTrie or its SequenceLifecycle; None when off."""
    try:
        return _TIERS.get(owner)
    except TypeError:  # None, or an object that cannot be weakly referenced
        return None


def seq_namespace(seq: Any) -> int:
    """The host namespace of a sequence's blocks: its adapter and cache salt (cache_salt.py)."""
    return cache_salt.namespace(seq.adapter_name, cache_salt.of_sequence(seq))


class NodeRecord:
    """What the tier knows of one trie node."""

    __slots__ = ("tier", "key", "parent_key", "ns", "tokens", "saved", "hits", "digest")

    def __init__(self, tier: "HostTier", key: Optional[int], parent_key: int = 0, ns: int = 0,
                 tokens: Optional[np.ndarray] = None, digest: Optional[bytes] = None):
        self.tier, self.key, self.parent_key, self.ns, self.tokens = tier, key, parent_key, ns, tokens
        self.saved = False
        self.hits = 0
        self.digest = digest  # the store's chain digest (store_keys.py), with a store behind the pool


_RECORDS: "weakref.WeakKeyDictionary[Any, NodeRecord]" = weakref.WeakKeyDictionary()


def record_of(node: Any) -> Optional[NodeRecord]:
    return _RECORDS.get(node)


def padded_tail(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """A partial block's tokens as the index keys them (module docstring)."""
    out = np.full(block_size, TAIL_PAD, dtype=np.int32)
    out[:len(tokens)] = tokens
    return out


@dataclass
class _PendingRestore:
    slots: np.ndarray   # host slots in prefix order, pinned in the index (a session tail last)
    first_block: int    # index in seq.logical_blocks of the first restored block
    hit_tokens: int     # tokens the slots hold: whole blocks, plus a tail's tokens
    tail_tokens: int = 0  # of those, the session tail's (its slot is the last)
    fresh: Optional[np.ndarray] = None  # logical ids allocated for them, before trie dedup


@dataclass
class HostTierStats:
    queried_tokens: int = 0   # tokens looked up in host memory (after the GPU trie)
    hit_tokens: int = 0       # of those, found in host memory
    blocks_saved: int = 0
    blocks_restored: int = 0
    saves_dropped: int = 0    # no evictable slot: every slot pinned or an inner node
    restores_skipped: int = 0  # another sequence attached the same block first
    tails_saved: int = 0      # session tails saved when their blocks were released
    tail_hit_tokens: int = 0  # of hit_tokens, those from session tails
    tails_planned: int = 0    # tail slots among blocks_restored + restores_skipped
    verify_failures: int = 0  # host hits whose bytes no longer matched their checksum (host_cache_verify)
    verify_dropped_blocks: int = 0  # blocks those failures dropped from the index
    verify_unconfirmed_blocks: int = 0  # hit blocks not served because their save had not completed yet


class HostTier:
    """Scheduler-side host tier of one engine (one index for all ranks)."""

    def __init__(self, num_slots: int, block_size: int, write_policy: str, bytes_per_block: int,
                 allocator: Any, num_gpu_blocks: int = 0, restore_policy: str = DEFAULT_RESTORE_POLICY,
                 rank_block_bytes: int = 0, config_id: Optional[int] = None, verify: bool = False):
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"host_cache_write_policy must be one of {WRITE_POLICIES}, got {write_policy!r}")
        self.index = _core.TierIndex(num_slots, block_size)
        self._evictions_before = 0  # host evictions of indexes dropped by reset()
        self.block_size = block_size
        self.write_policy = write_policy
        self.bytes_per_block = bytes_per_block  # over all ranks
        self.allocator = allocator              # LMDeploy's LogicalAllocator: logical -> physical ids
        self.stats = HostTierStats()
        self._pre: list[tuple[int, int]] = []   # (slot, physical block) saved before the next forward
        self._post_nodes: list[Any] = []        # nodes whose block the next forward computes
        self._restores: dict[int, _PendingRestore] = {}  # seq_id -> restore waiting for its forward
        self._evicted = False  # the GPU trie evicted a block since the last plan (see HostCopyPlan.wait_saves)
        # Physical blocks of the last two planned batches (HostCopyPlan.
        # restore_after_forward): one forward is in flight while LMDeploy
        # schedules the next; the older set is a margin.
        self._in_flight: tuple[np.ndarray, np.ndarray] = (_NO_BLOCKS, _NO_BLOCKS)
        # seq_id -> tokens its tentative match looked up in host memory, hit
        # or miss: a rollback undoes them, as LMDeploy restores its own stats.
        self._queried: dict[int, int] = {}
        self._tails: dict[int, int] = {}  # seq_id -> tokens of its saved session tail
        # seq_id -> (tokens it had computed, whether it was preempted) when its
        # blocks were reclaimed or it was preempted: what a cache that never
        # evicts keeps, and what one that never preempts never recomputes (lost_hits.py)
        self._released: dict[int, tuple[int, bool]] = {}
        self.lost = LostHits(shadow_keys(num_slots, num_gpu_blocks))
        # Each rank copies its share of a block in parallel with the others.
        self.decider = RestoreDecider(restore_policy, rank_block_bytes or bytes_per_block, block_size)
        self.restore_size = Histogram(SIZE_BOUNDS_BYTES)
        self.continuations = Continuations(self.lost.shadow_keys)  # write_through_selective
        self._removing: Optional[int] = None  # seq_id whose release saves no tail (removal, rollback)
        self._rolling_back: Optional[int] = None  # seq_id inside LMDeploy's admission rollback
        # Stopped sequences' tails pay only if their session continues, which
        # LMDeploy 0.18.0's serving stack never does (docs/lmdeploy_hook_notes.md
        # section 10): set by drivers that keep sessions open (the replay's interactive mode).
        self.save_stopped_tails = False
        # The ledgers of this engine's ranks in this process (slot_ledger.py),
        # by the id of its cache config; None: ranks elsewhere, none to read.
        self.config_id = config_id
        self.verify = verify
        self.off: Optional[str] = None  # why the tier stopped mid-run (its pool became unusable)
        self.store: Any = None  # store_tier.StoreTier behind the pool (use_store), or None

    def _ledgers(self) -> list:
        """This engine's ranks' ledgers in this process (rebuilt with their pools after a sleep)."""
        found = slot_ledger.ledgers(self.config_id) if self.config_id is not None else []
        for ledger in found:
            ledger.watched = True  # a lost pool is now said here, not raised on the rank
        return found

    def _pool_lost(self) -> bool:
        """Whether a rank's pool became unusable; said once, and from then on
        nothing is saved or matched (restores already matched still run)."""
        if self.off is None:
            lost = next((x.lost for x in self._ledgers() if x.lost), None)
            if lost is None:
                return False
            self.off = lost
            log_once(f"host cache off for the rest of the run: {lost}; serving goes on without it")
        return True

    def use_store(self, store: Any) -> None:
        """A Mooncake Store behind the pool (store_tier.py): from now on
        saved blocks are put to it and matches continue in it."""
        self.store = store
        for rec in list(_RECORDS.values()):
            if rec.tier is self and rec.key == ROOT_KEY:
                rec.digest = store.root

    def serve(self, *owners: Any) -> None:
        """`tier_of(owner)` is this tier from now on."""
        for owner in owners:
            _TIERS[owner] = self

    # ----- keys ---------------------------------------------------------

    def add_root(self, root: Any) -> None:
        if root not in _RECORDS:
            _RECORDS[root] = NodeRecord(self, ROOT_KEY, digest=self.store.root if self.store is not None else None)

    def on_attach(self, node: Any, parent_record: NodeRecord) -> None:
        """A trie node attached under a node this tier knows (schedule time,
        before the forward fills it)."""
        salt, content = cache_salt.split(node.extra_identity) if node.extra_identity else (None, ())
        if parent_record.key is None or content:
            _RECORDS[node] = NodeRecord(self, None)
            return
        ns = cache_salt.namespace(node.adapter_name, salt)
        tokens = as_tokens(node.token_ids)
        key = _core.chain_key(parent_record.key, ns, tokens)
        digest = (store_keys.block_digest(parent_record.digest, ns, tokens)
                  if self.store is not None and parent_record.digest is not None else None)
        _RECORDS[node] = NodeRecord(self, key, parent_record.key, ns, tokens, digest)
        self.lost.computed(key)
        if self.write_policy == "write_through":
            self._post_nodes.append(node)

    def on_gpu_hits(self, nodes: list[Any]) -> None:
        """The GPU trie served these nodes to a sequence."""
        if self.write_policy != "write_through_selective":
            return
        for node in nodes:
            rec = _RECORDS.get(node)
            if rec is None or rec.key is None or rec.saved:
                continue
            rec.hits += 1
            if rec.hits >= SELECTIVE_MIN_HITS:
                self._post_nodes.append(node)

    def on_evict(self, node: Any) -> None:
        """The GPU trie is evicting this leaf; its block is still allocated
        (LMDeploy frees the batch at the end of the eviction pass)."""
        # Any policy: the block may be reused by the next forward while an
        # earlier save still reads it (HostCopyPlan.wait_saves).
        self._evicted = True
        rec = _RECORDS.get(node)
        saves = self.write_policy == "write_back" or (self.write_policy == "write_through_selective"
                                                      and self.continuations.likely())
        if not saves or rec is None or rec.key is None or rec.saved:
            return
        physical = self._physical(node.block_id)
        slot = self._store(rec)
        if slot is not None:
            self._pre.append((slot, physical))

    def note_evicted(self) -> None:
        """The GPU trie freed trie-owned blocks (BlockTrie.evict)."""
        self._evicted = True

    def _physical(self, logical: int) -> int:
        return int(self.allocator.get_physical_blocks(np.array([logical]))[0])

    def _reserve(self, parent: int, ns: int, tokens: np.ndarray,
                 digest: Optional[bytes] = None) -> tuple[str, int, Optional[int]]:
        """Inserts one block into the index: (status, key, the slot to copy
        it to, or None when it is already stored or cannot be); with a store,
        a block with a digest is put to it once saved."""
        if self.off is not None:
            return "off", 0, None  # the pool is lost: nothing more is saved
        status, key, slot = self.index.reserve(parent, ns, tokens)
        if status == "created":
            # Settled as planned (module docstring): the restore of a later
            # plan reads this save's bytes on every rank.
            self.index.saved(slot, True)
            for ledger in self._ledgers():
                ledger.planned(slot)
            if self.store is not None:
                self.store.created(slot, digest)
            self.stats.blocks_saved += 1
            return status, key, slot
        if status in ("full", "collision"):
            self.stats.saves_dropped += 1
        return status, key, None

    def _store(self, rec: NodeRecord) -> Optional[int]:
        """A trie node's block into the index (_reserve); the slot to copy it to."""
        status, key, slot = self._reserve(rec.parent_key, rec.ns, rec.tokens, rec.digest)
        if status == "off":
            return None
        rec.saved = True
        if status in ("full", "collision"):
            self.lost.dropped(key)
        else:
            self.lost.saved(key)
        return slot

    # ----- matching -----------------------------------------------------

    def continue_match(self, trie: Any, seq: Any) -> None:
        """After the GPU trie matched seq up to its cursor, continue in host
        memory: pin the hit slots, advance the sequence past them (the normal
        allocation then gives them fresh blocks), count the hit tokens."""
        cursor = seq.prefix_cache.trie_cursor
        if cursor is None or seq.seq_id in self._restores or self._pool_lost():
            return
        if self.verify and not self._ledgers():  # ranks not built yet: nothing could be verified
            return
        if self.write_policy == "write_through_selective":
            self.continuations.resumed(seq.seq_id)
        if seq.prefix_cache.multimodal_spans:
            log_once("requests with multimodal inputs are served by the GPU prefix cache only (their blocks carry "
                     "content identity the host index does not key on)")
            return
        # Router replay: LMDeploy replays the routed experts of GPU hits from
        # the trie nodes (and stops its own match where they are missing);
        # host entries carry none, so a host hit would leave the sequence's
        # routed-expert history short and misaligned.
        if seq.return_routed_experts:
            return
        cursor_record = _RECORDS.get(cursor)
        start = cursor.prefix_len
        # A cursor left on a node the trie has since detached (no parent, not
        # a root) continues nothing: its block is gone from the GPU trie.
        detached = cursor.parent is None and cursor.block_id >= 0
        if cursor_record is None or cursor_record.key is None or detached or seq.num_history_ids != start:
            return
        bs = self.block_size
        # Same bounds as LMDeploy's own walk: never the block holding the last
        # token, and the sequence's clamps (multimodal spans, limits).
        end = (seq.num_valid_ids - 1) // bs * bs
        end = seq.clamp_prefix_cache_match_step(min(end, seq.get_prefix_cache_max_match_step()))
        ns = seq_namespace(seq)
        keys, slots = _NO_BLOCKS, _NO_SLOTS
        queried = 0
        if end > start:
            queried = end - start
            tokens = as_tokens(seq.history_cache[start:end])
            keys, slots = self.index.match(cursor_record.key, ns, tokens, True)
            n = self._servable(seq, slots, start)
            cut = n < len(slots)
            keys, slots = keys[:n], slots[:n]
            if self.store is not None and not cut and start + n * bs < end:
                keys, slots = self._continue_in_store(cursor_record, ns, tokens, keys, slots)
        after = start + len(slots) * bs
        parent = keys[-1] if len(keys) else cursor_record.key
        tail, tail_tokens = self._match_tail(seq, parent, ns, after)
        if tail is not None and not self._servable(seq, np.array([tail], dtype=np.uint32), after):
            tail, tail_tokens = None, 0
        rest = (_core.block_keys(parent, ns, as_tokens(seq.history_cache[after:end]), bs) if end > after
                else _NO_BLOCKS)
        if self.write_policy == "write_through_selective":
            self.continuations.admitted((cursor_record.key, *keys, *rest))
        self._note_lost(seq, rest, after, end, after + tail_tokens)
        queried += tail_tokens  # 0 without a tail
        self.stats.queried_tokens += queried
        self._queried[seq.seq_id] = queried
        if tail is not None:
            slots = np.append(slots, np.uint32(tail))
        if not len(slots):
            return
        hit = after - start + tail_tokens
        if self.decider.restore_blocks(seq.seq_id, len(slots), hit) == 0:
            # Recomputing is estimated faster (or the policy says never):
            # the hit is given back and counted as lost by choice (a
            # preempted sequence's recompute is counted whole when it runs).
            self.index.release(slots)
            released = self._released.get(seq.seq_id)
            if released is None or not released[1]:
                self.lost.note(seq.seq_id, "recomputed_by_choice", hit)
            return
        self._restores[seq.seq_id] = _PendingRestore(slots, start // bs, hit, tail_tokens)
        seq.set_step(start + hit)
        if not seq.prefix_cache.suppress_match_stats:
            trie.stats.num_hit_tokens += hit  # rollback restores LMDeploy's snapshot of these stats
        self.stats.hit_tokens += hit
        self.stats.tail_hit_tokens += tail_tokens

    def _continue_in_store(self, cursor_record: NodeRecord, ns: int, tokens: np.ndarray, keys: np.ndarray,
                           slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The host match (keys, slots over `tokens`) continued by the blocks
        the store holds next, fetched into host slots (store_tier.extend)."""
        if self.decider.policy == "never":
            return keys, slots  # every hit is recomputed: nothing to fetch for
        bs = self.block_size
        n = len(slots)
        digest = self.store.digest_after(cursor_record.digest, ns, tokens[:n * bs])
        parent = int(keys[-1]) if n else cursor_record.key
        more_keys, more_slots = self.store.extend(self.index, self._ledgers(), parent, digest, ns, tokens[n * bs:])
        if not len(more_slots):
            return keys, slots
        return np.concatenate([keys, more_keys]), np.concatenate([slots, more_slots]).astype(np.uint32)

    def _servable(self, seq: Any, slots: np.ndarray, start: int) -> int:
        """How many of the matched `slots` (pinned, a prefix from token
        `start`) every local rank can restore as they are (slot_ledger.check);
        the pins of the rest are given back, and with a checksum mismatch
        that slot and all after it leave the index: the request recomputes
        from there."""
        n = len(slots)
        why = ""
        for ledger in self._ledgers():
            m, reason = ledger.check(slots[:n])
            if m < n:
                n, why = m, reason
        if n == len(slots):
            return n
        rest = slots[n:]
        if why == slot_ledger.MISMATCH:
            self.index.drop(rest)
            self.stats.verify_failures += 1
            self.stats.verify_dropped_blocks += len(rest)
            logger.warning("lmdeploy-hostcache: host slot %d failed its checksum for request %s (session %s): "
                           "%d block(s) dropped from the host cache, recomputed from token %d", int(rest[0]),
                           seq.seq_id, getattr(seq, "session_id", "?"), len(rest),
                           start + n * self.block_size)
        elif why == slot_ledger.UNKNOWN:
            # The store was built again under this index: the entries hold nothing. Dropped, so that the
            # blocks, recomputed, are saved again instead of meeting a dead entry.
            self.index.drop(rest)
            log_once("a rank's host store was built again while the scheduler kept its index: entries it never "
                     "held are dropped and recomputed")
        else:  # UNCONFIRMED or LOST: nothing wrong with the bytes is known, they are just not served now
            self.index.release(rest)
            if why == slot_ledger.UNCONFIRMED:
                self.stats.verify_unconfirmed_blocks += len(rest)
        return n

    def _note_lost(self, seq: Any, rest: np.ndarray, after: int, end: int, served: int) -> None:
        """What this admission recomputes that a never-evicting cache would
        have served (lost_hits.py): `served` tokens are cached now, whole
        host blocks reach `after`, LMDeploy's match could reach `end`;
        `rest` holds the chain keys of the blocks from `after` to `end`."""
        bs = self.block_size
        released = self._released.get(seq.seq_id)  # kept until the sequence runs: a rollback retries
        if released is not None and released[1]:
            return  # preempted: counted when it runs (_planned_restores)
        blocks, cause = 0, None
        if len(rest):
            blocks, cause = self.lost.chain_loss(rest)
        chain = min(blocks * bs, max(0, end - served))
        if cause is not None:
            self.lost.note(seq.seq_id, cause, chain)
        if released is not None:  # its blocks were reclaimed: such a cache would have kept them
            self.lost.note(seq.seq_id, "partial_block", released[0] - max(served, after + chain))

    def _match_tail(self, seq: Any, parent_key: int, ns: int, at: int) -> tuple[Optional[int], int]:
        """The slot (pinned) of seq's session tail if it continues the
        prefix at token `at` and leaves the last token to compute, and its tokens."""
        n = self._tails.get(seq.seq_id, 0)
        # LMDeploy's limits on a match, less their rounding to whole blocks:
        # the last token (and a logprob start) stays to compute, and no
        # multimodal span or embedding may be cut.
        if n == 0 or at % self.block_size or at + n > seq.get_prefix_cache_max_candidate_step():
            return None, 0
        if seq.prefix_cache.recompute_overlap.recompute_blocks > 0 or not seq.is_prefix_cache_boundary_safe(at + n):
            return None, 0
        _, slots = self.index.match(parent_key, ns, padded_tail(seq.history_cache[at:at + n], self.block_size),
                                    True)
        return (int(slots[0]), n) if len(slots) else (None, 0)

    def on_release(self, seq: Any) -> None:
        """seq's blocks are about to go back to LMDeploy's allocator: save its
        session tail (module docstring), then drop a restore never planned."""
        if seq.seq_id != self._removing:  # (_removing also covers a rollback that undoes a host hit)
            # A rollback's step includes what the tentative match found: not this sequence's to keep.
            if seq.num_history_ids > 0 and seq.seq_id not in self._restores and seq.seq_id != self._rolling_back:
                self._released.setdefault(seq.seq_id, (seq.num_history_ids, False))  # a preemption stays one
            if self.save_stopped_tails or not _is_stopped(seq):
                self._save_tail(seq)
        self.cancel(seq)

    def on_turn_end(self, seq: Any) -> None:
        """seq's turn ended (RUNNING to STOPPED): write_through_selective
        notes where its conversation would continue (module docstring)."""
        if self.write_policy != "write_through_selective":
            return
        cursor = seq.prefix_cache.trie_cursor
        rec = _RECORDS.get(cursor) if cursor is not None else None
        self.continuations.ended(seq.seq_id, rec.key if rec is not None and cursor.parent is not None else None)

    def on_preempt(self, seq: Any) -> None:
        """A running sequence goes back to waiting (LMDeploy's preempt_seqs)."""
        self._released[seq.seq_id] = (seq.num_history_ids, True)

    def _save_tail(self, seq: Any) -> None:
        bs = self.block_size
        h = seq.num_history_ids
        n = h % bs
        # A pending restore means these tokens' KV has not landed yet.
        if n == 0 or seq.seq_id in self._restores or seq.num_blocks * bs < h:
            return
        if seq.prefix_cache.multimodal_spans or seq.return_routed_experts:
            return  # not keyed / not replayable here, as in continue_match
        cursor = seq.prefix_cache.trie_cursor
        rec = _RECORDS.get(cursor) if cursor is not None else None
        start = h - n
        if rec is None or rec.key is None or cursor.prefix_len != start:
            return  # the chain up to the tail is not the trie's: no key to save it under
        self._tails.pop(seq.seq_id, None)  # an older tail is not this history's
        status, _, slot = self._reserve(rec.key, seq_namespace(seq),
                                        padded_tail(seq.history_cache[start:h], bs))
        if slot is not None:
            self._pre.append((slot, self._physical(seq.logical_blocks.get_real_blocks()[start // bs])))
            self._evicted = True  # the block is freed now: the next forward waits for this save
            self.stats.tails_saved += 1
        elif status in ("full", "collision", "off"):
            return
        self._tails[seq.seq_id] = n

    def removing(self, seq: Any) -> "_ReleaseFlag":
        """Around LMDeploy's remove_sequence: the session ends, its tail is not kept."""
        return _ReleaseFlag(self, seq.seq_id, "_removing", forget=True)

    def rolling_back(self, seq: Any, tentative: bool) -> "_ReleaseFlag":
        """Around LMDeploy's admission rollback: its release is no reclaim to
        account for, and with a host hit undone (tentative) saves no tail."""
        return _ReleaseFlag(self, seq.seq_id, "_removing" if tentative else "_rolling_back", forget=False)

    def cancel(self, seq: Any) -> None:
        """The sequence gave up its blocks (rollback, preemption, stop, end)
        before its restore was planned: drop the pins."""
        self.stats.queried_tokens -= self._queried.pop(seq.seq_id, 0)  # a retried match counts them again
        self.lost.rollback(seq.seq_id)
        self.decider.rollback(seq.seq_id)
        pending = self._restores.pop(seq.seq_id, None)
        if pending is not None:
            self.stats.hit_tokens -= pending.hit_tokens
            self.stats.tail_hit_tokens -= pending.tail_tokens
            self.index.release(pending.slots)

    def before_trie_allocate(self, seq: Any) -> None:
        """Blocks were just allocated; note which logical ids the restore targets."""
        pending = self._restores.get(seq.seq_id)
        if pending is not None and pending.fresh is None:
            real = seq.logical_blocks.get_real_blocks()
            pending.fresh = np.array(real[pending.first_block:pending.first_block + len(pending.slots)])

    # ----- plans --------------------------------------------------------

    def take_plan(self, running: list[Any]) -> HostCopyPlan:
        """Everything the forward about to be dispatched must carry."""
        if self.store is not None:
            self.store.pump(self.index, self._ledgers())
        pre, self._pre = self._pre, []
        restore = self._planned_restores(running)
        post = self._planned_saves()
        # (With the pool lost no new save is reserved; those reserved before
        # still go to the ranks, which mark them skipped: slot_ledger.unservable.)
        wait_saves, self._evicted = self._evicted, False
        # A restore into a block a pre save reads queues behind that save on
        # every rank (SlotStore orders shared blocks across its streams), and
        # the save behind the forwards queued: waiting here too is explicit.
        pre_blocks = {b for _, b in pre}
        after_forward = any(b in pre_blocks for _, b in restore) or self._touches_in_flight(restore)
        self._note_in_flight(running)
        return HostCopyPlan.build(pre, restore, post, wait_saves=wait_saves, restore_after_forward=after_forward)

    def _planned_restores(self, running: list[Any]) -> list[tuple[int, int]]:
        """(slot, physical block) restores of the running sequences' host hits, settled in the index."""
        restore: list[tuple[int, int]] = []
        for seq in running:
            self._queried.pop(seq.seq_id, None)
            released = self._released.pop(seq.seq_id, None)
            if released is not None and released[1]:
                # Such a cache never preempts: all this admission computes is lost to the preemption.
                self.lost.note(seq.seq_id, "preempted", seq.num_all_ids - seq.num_history_ids)
            self.lost.commit(seq.seq_id)
            self.decider.commit(seq.seq_id)
            pending = self._restores.pop(seq.seq_id, None)
            if pending is None:
                continue
            n = len(pending.slots)
            logical = np.array(seq.logical_blocks.get_real_blocks()[pending.first_block:pending.first_block + n])
            if len(logical) != n:
                raise RuntimeError(f"host-cache restore of {n} blocks found {len(logical)} allocated blocks")
            physical = self.allocator.get_physical_blocks(logical)
            # A block another sequence attached first (trie dedup) is already
            # being filled by that sequence: leave it alone.
            taken = np.ones(n, dtype=bool) if pending.fresh is None else logical == pending.fresh
            self.stats.restores_skipped += int(n - np.count_nonzero(taken))
            self.stats.tails_planned += pending.tail_tokens > 0
            self.index.release(pending.slots[~taken])
            # The restore takes the match's pins over and is settled as
            # planned (module docstring): later copies into these slots queue behind it.
            slots = pending.slots[taken]
            self.index.begin_restore(slots, True)
            self.index.restored(slots, True, True)
            restore += zip(slots.tolist(), np.asarray(physical)[taken].tolist())
            if self.store is not None:  # a slot is filled from the store only once these ran (slot_ledger.quiet)
                for ledger in self._ledgers():
                    ledger.planned_restore(slots)
            if len(slots):
                self.restore_size.observe(len(slots) * self.bytes_per_block)
        self.stats.blocks_restored += len(restore)
        return restore

    def _planned_saves(self) -> list[tuple[int, int]]:
        """(slot, physical block) saves of the nodes this forward computes."""
        post_slots, post_logical = [], []
        nodes, self._post_nodes = self._post_nodes, []
        for node in nodes:
            rec = _RECORDS.get(node)
            if rec is None or not node.is_attached():
                continue
            slot = self._store(rec)
            if slot is not None:
                post_slots.append(slot)
                post_logical.append(node.block_id)
        if not post_slots:
            return []
        physical = self.allocator.get_physical_blocks(np.array(post_logical))  # one lookup for all saves
        return [(slot, int(p)) for slot, p in zip(post_slots, physical)]

    def _touches_in_flight(self, restore: list[tuple[int, int]]) -> bool:
        if not restore:
            return False
        blocks = np.fromiter((b for _, b in restore), dtype=np.int64, count=len(restore))
        return bool(np.isin(blocks, self._in_flight[0]).any() or np.isin(blocks, self._in_flight[1]).any())

    def _note_in_flight(self, running: list[Any]) -> None:
        # One concatenation and one lookup per forward: this runs every decode step.
        logical = [seq.logical_blocks.get_real_blocks() for seq in running]
        current = (self.allocator.get_physical_blocks(np.concatenate(logical)) if logical else _NO_BLOCKS)
        self._in_flight = (np.asarray(current, dtype=np.int64), self._in_flight[0])

    def reset(self) -> None:
        """The engine slept: its KV pools were released (and the ranks'
        stores with them) and the weights may change before it wakes. Forget
        every host entry and everything planned; figures stay cumulative.

        LMDeploy 0.18.0 keeps its trie over a sleep, though the pools its
        blocks lived in are gone (wakeup allocates new ones): no block
        attached before the sleep is ever saved afterwards (write_back would
        save it when the trie evicts it), or host memory would serve what
        the new pools happen to hold. Their keys stay, for blocks computed
        under them after the wakeup."""
        for rec in list(_RECORDS.values()):
            if rec.tier is self:
                rec.saved = True
        self._evictions_before += self.index.evictions
        self.index = _core.TierIndex(self.index.capacity, self.block_size)
        self._pre, self._post_nodes, self._restores, self._queried, self._tails = [], [], {}, {}, {}
        self._released = {}
        self.continuations.reset()
        self.decider.reset()
        self.lost.reset()
        self._evicted = False
        self._in_flight = (_NO_BLOCKS, _NO_BLOCKS)
        if self.store is not None:
            self.store.reset()

    def has_pending_restore(self, seq: Any) -> bool:
        return seq.seq_id in self._restores

    def pending_restore_tokens(self, seq: Any) -> int:
        """Prompt tokens of `seq` that the next plan restores from host memory."""
        pending = self._restores.get(seq.seq_id)
        return pending.hit_tokens if pending is not None else 0

    def metrics(self) -> dict:
        """Figures for LMDeploy's metrics path (hooks/scheduler.py)."""
        s = self.stats
        used, total = self.index.used, self.index.capacity
        return {
            "host_hit_tokens": s.hit_tokens, "host_queried_tokens": s.queried_tokens,
            "host_hit_rate": s.hit_tokens / s.queried_tokens if s.queried_tokens else 0.0,
            "host_blocks_saved": s.blocks_saved, "host_blocks_restored": s.blocks_restored,
            "host_bytes_saved": s.blocks_saved * self.bytes_per_block,
            "host_bytes_restored": s.blocks_restored * self.bytes_per_block,
            "host_saves_dropped": s.saves_dropped, "host_tails_saved": s.tails_saved,
            "host_tail_hit_tokens": s.tail_hit_tokens, **self.lost.metrics(),
            "host_evictions": self._evictions_before + self.index.evictions,
            "host_slots_used": used, "host_slots_total": total, "host_occupancy": used / total,
            **self.decider.metrics(), "host_restore_size": self.restore_size.snapshot(),
            "host_verify_failures": s.verify_failures, "host_verify_dropped_blocks": s.verify_dropped_blocks,
            "host_verify_unconfirmed_blocks": s.verify_unconfirmed_blocks, "host_tier_off": int(self.off is not None),
            **(self.store.metrics() if self.store is not None else {}),
        }


def _is_stopped(seq: Any) -> bool:
    from lmdeploy.pytorch.messages import MessageStatus

    return seq.status == MessageStatus.STOPPED


class _ReleaseFlag:
    """Marks seq_id in one of the tier's release flags (`_removing`: saves no
    tail; `_rolling_back`: records no reclaim) for LMDeploy's call inside;
    with forget, the tier then drops all it kept for the sequence."""

    def __init__(self, tier: HostTier, seq_id: int, flag: str, forget: bool):
        self.tier, self.seq_id, self.flag, self.forget = tier, seq_id, flag, forget
        self.before: Optional[int] = None

    def __enter__(self) -> None:
        self.before = getattr(self.tier, self.flag)
        setattr(self.tier, self.flag, self.seq_id)

    def __exit__(self, *exc: Any) -> None:
        setattr(self.tier, self.flag, self.before)
        if self.forget:
            self.tier._tails.pop(self.seq_id, None)
            self.tier._released.pop(self.seq_id, None)
            self.tier.continuations.forget(self.seq_id)
            self.tier.lost.rollback(self.seq_id)


def prepare(cache_config: Any) -> None:
    """Before LMDeploy builds the Scheduler: the tier needs the prefix cache."""
    if not host_cache_requested(cache_config):
        return
    if "host_cache_slots" not in cache_config.__dict__:
        turn_off(cache_config, off_reason(cache_config) or "no host pool was sized for this engine")
    if tier_slots(cache_config) <= 0:
        return  # off, and said why when the pool was sized
    if not cache_config.enable_prefix_caching:
        log_once("the host cache extends the prefix cache: turning enable_prefix_caching on")
        cache_config.enable_prefix_caching = True


def attach(scheduler: Any) -> None:
    """After LMDeploy built the Scheduler: give it, its trie and its roots a HostTier."""
    cc = scheduler.cache_config
    slots = tier_slots(cc)
    if slots <= 0 or not scheduler.block_trie.enabled:
        return
    tier = HostTier(num_slots=slots, block_size=cc.block_size,
                    write_policy=getattr(cc, "host_cache_write_policy", "write_through"),
                    bytes_per_block=getattr(cc, "host_cache_block_bytes", 0),
                    allocator=scheduler.block_manager.allocator, num_gpu_blocks=cc.num_gpu_blocks,
                    restore_policy=getattr(cc, "host_cache_restore_policy", DEFAULT_RESTORE_POLICY),
                    rank_block_bytes=getattr(cc, "host_cache_rank_block_bytes", 0), config_id=id(cc),
                    verify=bool(getattr(cc, "host_cache_verify", False)))
    tier.serve(scheduler, scheduler.block_trie, scheduler.sequence_lifecycle)
    for root in scheduler.block_trie._roots.values():
        tier.add_root(root)
    log_once(f"host cache on: {slots} blocks per rank, write policy {tier.write_policy}, "
             f"restore policy {tier.decider.policy}{', restores verified' if tier.verify else ''}")
