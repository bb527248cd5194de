"""LMDeploy 0.18.0's real Scheduler and block trie, driven the way its engine
loop drives them, with CPU tensors shaped like the real KV pools standing in
for GPU memory and a fake forward in place of the model.

The fake forward writes, for every token it computes, bytes derived from the
token's whole prefix (what a real forward's K/V depend on), and before that
checks that every earlier token of every sequence in the batch already holds
exactly the bytes a fresh computation would write. The host tier's copy plans
are executed by the core's SlotStore against the same tensors, so a restore
that lands wrong bytes, too late, or in the wrong block fails the run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from benchmark.engine_loop import EngineLoop, build_scheduler
from lmdeploy_patch import rank_tier, store_tier
from lmdeploy_patch.rank_tier import build_worker_tier

_MUL = np.uint64(0x9E3779B97F4A7C15)


def prefix_hashes(tokens: np.ndarray) -> np.ndarray:
    """h[p] depends on tokens[0..p]: a stand-in for what K/V at p depend on."""
    h = np.empty(len(tokens), dtype=np.uint64)
    acc = np.uint64(0x243F6A8885A308D3)
    with np.errstate(over="ignore"):
        for i, t in enumerate(tokens.astype(np.uint64)):
            acc = (acc ^ t) * _MUL + np.uint64(i + 1)
            h[i] = acc
    return h


def kv_rows(h: np.ndarray, layer: int, row_bytes: int) -> np.ndarray:
    """The bytes a forward writes for positions with prefix hashes h, in one layer."""
    with np.errstate(over="ignore"):
        x = (h[:, None] ^ np.uint64(layer * 0x51ED27)) * _MUL + np.arange(row_bytes, dtype=np.uint64)[None, :] * _MUL
    return (x >> np.uint64(56)).astype(np.uint8)


class RankCacheEngine:
    """Stands in for a rank's LMDeploy CacheEngine as the key of its store."""


@dataclass
class SimStats:
    forwards: int = 0
    tokens_computed: int = 0
    tokens_checked: int = 0
    trace: list = field(default_factory=list)


class SimEngine:
    def __init__(self, num_gpu_blocks: int, host_slots: int = 0, block_size: int = 16, layers: int = 2,
                 row_bytes: int = 8, policy: str = "write_through", max_batches: int = 4,
                 deterministic: bool = True, ranks: int = 1, verify: bool = False, restore_policy: str = "auto",
                 store: str | None = None, store_namespace: str = "sim"):
        """store: a Mooncake config file (lmdeploy_patch/store_tier.py behind the host tier, each rank linked)."""
        self.block_bytes = layers * block_size * row_bytes
        self.scheduler = build_scheduler(num_gpu_blocks, block_size, max_batches, host_slots, policy,
                                         self.block_bytes, logical_clock=deterministic, restore_policy=restore_policy)
        cc = self.scheduler.cache_config
        cc.host_cache_verify = verify  # read by the ranks built below (their ledgers check the bytes)
        self.loop = EngineLoop(self.scheduler, lambda batch, plan, prefill, host_tokens: self.forward(batch, plan))
        self.tier = self.loop.tier
        if self.tier is not None:  # sessions stay open between turns here: their stopped tails pay
            self.tier.save_stopped_tails = True
        self.bs, self.layers, self.row_bytes = block_size, layers, row_bytes
        # LMDeploy's packed pool per rank (a tensor-parallel shard each):
        # [layers, blocks, bytes of one layer's block]
        self.pools = [torch.zeros(layers, num_gpu_blocks, block_size * row_bytes, dtype=torch.uint8)
                      for _ in range(ranks)]
        self.pool = self.pools[0]
        self.workers = []
        self.cache_engines = [RankCacheEngine() for _ in self.pools]  # what a rank's store is registered under
        if self.tier is not None:
            for pool, key in zip(self.pools, self.cache_engines):  # each rank's side, as the agent hook builds it
                allocation = SimpleNamespace(pools=[SimpleNamespace(tensor=pool, entry_axis=1)])
                self.workers.append(build_worker_tier(cc, allocation, blocks_per_logical=1))
                rank_tier.register(key, self.workers[-1])
            if store is not None:  # what the scheduler hook and the agent hook do when the config names one
                cc.host_cache_store, cc.host_cache_store_namespace = store, store_namespace
                store_tier.attach(self.tier, cc)
                for rank, worker in enumerate(self.workers):
                    rank_tier.connect_store(cc, worker, rank)
        self.worker = self.workers[0] if self.workers else None
        self.stats = SimStats()
        self.sessions: dict[int, object] = {}
        self.rng = np.random.default_rng(0)

    # -- the fake forward ------------------------------------------------------

    def _rows(self, block: int, rank: int = 0) -> torch.Tensor:
        return self.pools[rank][:, block, :].view(self.layers, self.bs, self.row_bytes)

    def forward(self, running: list, plan=None) -> None:
        """One forward; `plan` is the one its payload carries (taken here when None)."""
        if plan is None and self.tier is not None:
            plan = self.tier.take_plan(running)
        for worker in self.workers:  # every rank executes the same plan
            worker.before_model(plan, stream=None)
        tables = self.scheduler.get_block_tables(running)
        for seq, table in zip(running, tables):
            tokens = np.asarray(seq.history_cache[:seq.num_all_ids])
            h = prefix_hashes(tokens)
            start = seq.num_history_ids
            for rank in range(len(self.pools)):
                self._check_and_compute(seq, table, h, start, len(tokens), rank)
            self.stats.tokens_checked += start
            self.stats.tokens_computed += len(tokens) - start
            self.stats.trace.append((seq.session_id, start, len(tokens)))
        for worker in self.workers:
            worker.after_model(plan, stream=None)
        self.stats.forwards += 1

    def _check_and_compute(self, seq, table, h: np.ndarray, start: int, end: int, rank: int) -> None:
        """Every earlier position must hold what a fresh computation writes;
        then write positions start..end-1. Each rank holds its own shard."""
        for layer in range(self.layers):
            salt = layer + 1000 * rank
            want = kv_rows(h[:start], salt, self.row_bytes)
            for b in range((start + self.bs - 1) // self.bs):
                lo, hi = b * self.bs, min(start, (b + 1) * self.bs)
                got = self._rows(int(table[b]), rank)[layer, : hi - lo].numpy()
                if not np.array_equal(got, want[lo:hi]):
                    raise AssertionError(f"seq {seq.seq_id}: block {b} (physical {table[b]}) rank {rank} layer "
                                         f"{layer} holds wrong KV for positions {lo}..{hi - 1}")
            for p in range(start, end):
                b, r = divmod(p, self.bs)
                self._rows(int(table[b]), rank)[layer, r] = torch.from_numpy(kv_rows(h[p:p + 1], salt, self.row_bytes)[0])

    # -- the engine loop -------------------------------------------------------

    def _start(self, session_id: int, prompt: np.ndarray) -> object:
        seq = self.loop.start_turn(session_id, prompt, self.sessions.get(session_id))
        self.sessions[session_id] = seq
        return seq

    def turn(self, session_id: int, prompt: np.ndarray, decode_steps: int) -> object:
        """One chat turn: prefill of the prompt (on top of the history), then decode."""
        seq = self._start(session_id, prompt)
        while True:
            batch = self.loop.admit()
            assert batch, "the scheduler admitted nothing: pool too small for one sequence"
            if seq in batch:
                self._after_prefill(batch, decode_steps)
                return seq
            self._after_prefill(batch, decode_steps=0)

    def turns(self, prompts: dict[int, np.ndarray], decode_steps: int) -> None:
        """Several sessions' turns queued at once: admission works through them
        in batches and rolls back the ones that do not fit."""
        waiting = [self._start(sid, prompt) for sid, prompt in prompts.items()]
        done: set[int] = set()
        while len(done) < len(waiting):
            batch = self.loop.admit()
            assert batch, "the scheduler admitted nothing: pool too small for one sequence"
            self._after_prefill(batch, decode_steps)
            done.update(seq.session_id for seq in batch)

    def _finish_prefill(self, running: list, decode_steps: int) -> None:
        """A batch the caller scheduled itself: activated, forwarded, decoded, finished."""
        self.scheduler.activate_seqs(running)
        self.loop.forward_batch(running, prefill=True)
        self._after_prefill(running, decode_steps)

    def _after_prefill(self, running: list, decode_steps: int) -> None:
        for seq in running:
            self.loop.append(seq, self._token(), prefill=True)
        for _ in range(decode_steps):
            kept, preempted = self.loop.decode(running)
            assert not preempted
            for seq in kept:
                self.loop.append(seq, self._token(), prefill=False)
        for seq in running:
            seq.finish()

    def _token(self) -> int:
        return int(self.rng.integers(3, 30000))

    def end_all(self) -> None:
        for sid in list(self.sessions):
            self.scheduler.end_session(sid)
        self.sessions.clear()
        for key in self.cache_engines:
            rank_tier.unregister(key)  # (closes the ranks' store links too)

    def hit_rate(self) -> float:
        return self.scheduler.schedule_metrics.prefix_cache_hit_rate
