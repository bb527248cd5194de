"""LMDeploy 0.18.0's real Scheduler, stepped the way its engine loop steps it,
without a model: the one driver behind the CPU replay (replay.py) and the
scheduler-side tests and the soak (benchmark/sim_engine.py).

A step is what LMDeploy's engine loop does around one forward: schedule
(admission with prefix matching, or growing the running batch by a token,
preempting what does not fit), activate, take the forward's host copy plan
the way the inputs maker does (hooks/inputs_maker.py), run the forward, and
append the sampled token. The forward is the caller's: the replay counts
what it would cost, the tests write and check KV bytes. Which token is
sampled is the caller's too.

With the host tier installed (its .pth) and a cache config that asks for it,
the scheduler comes with the tier's real scheduler side attached.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Optional

import numpy as np

# forward(batch, plan, prefill, host_tokens): host_tokens maps seq_id to the
# prompt tokens of that sequence its plan restores from host memory.
Forward = Callable[[list, Optional[Any], bool, dict], None]


class LogicalClock:
    """Stands in for time.perf_counter in LMDeploy's block allocator, whose
    LRU keeps access times in whole seconds (ties broken by memory address):
    a counter makes its eviction order, and so every replay, reproducible.
    The engine tests use it too (tests/engine/site/lmdeploy_logical_lru.py),
    where a step of the counter must not race between threads."""

    def __init__(self) -> None:
        self._ticks = itertools.count(1)

    def perf_counter(self) -> float:
        return float(next(self._ticks))


def use_logical_clock() -> None:
    import lmdeploy.pytorch.paging.block_manager.base_block_manager as bbm

    bbm.time = LogicalClock()


def build_scheduler(num_gpu_blocks: int, block_size: int, max_batches: int, host_slots: int = 0,
                    write_policy: str = "write_through", kv_block_bytes: int = 0, logical_clock: bool = True,
                    restore_policy: str = "auto"):
    """LMDeploy's real Scheduler on CPU, with the host tier when host_slots > 0
    (the cache-config fields the executor hook sets after sizing the pool,
    lmdeploy_patch/pool_sizing.py)."""
    from lmdeploy.pytorch.config import CacheConfig, SchedulerConfig
    from lmdeploy.pytorch.messages import SequenceMeta
    from lmdeploy.pytorch.paging import Scheduler
    from lmdeploy.pytorch.strategies.ar.sequence import ARSequenceStrategy

    if logical_clock:
        use_logical_clock()
    cc = CacheConfig(max_batches=max_batches, block_size=block_size, num_cpu_blocks=0,
                     num_gpu_blocks=num_gpu_blocks, enable_prefix_caching=True, device_type="cpu",
                     num_reserved_gpu_blocks=1)
    if host_slots > 0:
        cc.host_cache_ratio = 1.0
        cc.host_cache_write_policy = write_policy
        cc.host_cache_restore_policy = restore_policy
        cc.host_cache_slots = host_slots
        cc.host_cache_block_bytes = kv_block_bytes
    return Scheduler(SchedulerConfig(max_batches=max_batches, max_session_len=1 << 20,
                                     max_request_output_len=1 << 16, eviction_type="recompute"),
                     cc, seq_meta=SequenceMeta(block_size, strategy=ARSequenceStrategy()))


class EngineLoop:
    """Steps one Scheduler; `forward` runs each forward (module docstring)."""

    def __init__(self, scheduler: Any, forward: Forward):
        from lmdeploy_patch.scheduler_tier import tier_of

        self.scheduler = scheduler
        self.tier = tier_of(scheduler)
        self.forward = forward

    def start_turn(self, session_id: int, tokens: np.ndarray, seq: Any = None) -> Any:
        """A new session's first prompt, or the next message of `seq`'s session."""
        import torch
        from lmdeploy.pytorch.messages import UpdateTokenMode

        if seq is None:
            return self.scheduler.add_session(session_id).add_sequence(torch.from_numpy(tokens))
        seq.update_token_ids(torch.from_numpy(tokens), mode=UpdateTokenMode.INPUTS)
        seq.activate()
        return seq

    def admit(self) -> list:
        """One prefill step: the batch LMDeploy admits (may be empty), forwarded."""
        out = self.scheduler.schedule(is_prefill=True, prealloc_size=0)
        batch = list(out.running)
        if batch:
            self.scheduler.activate_seqs(batch)
            self.forward_batch(batch, prefill=True)
        return batch

    def decode(self, running: list) -> tuple[list, list]:
        """One decode step of `running`: (the sequences forwarded, those preempted)."""
        valid = self.scheduler.schedule_running(running, num_required_tokens=1, prealloc_size=1)
        kept = [s for s, ok in zip(running, valid) if ok]
        preempted = [s for s, ok in zip(running, valid) if not ok]
        self.forward_batch(kept, prefill=False)
        return kept, preempted

    @staticmethod
    def append(seq: Any, token: int, prefill: bool) -> None:
        """The forward's sampled token joins the sequence."""
        from lmdeploy.pytorch.messages import UpdateTokenMode

        mode = UpdateTokenMode.PREFILL if prefill else UpdateTokenMode.DECODE
        seq.update_token_ids(np.array([token]), mode=mode)

    def forward_batch(self, batch: list, prefill: bool) -> None:
        """Takes the batch's plan (as the inputs maker does) and runs the forward."""
        plan = None
        host_tokens: dict = {}
        if self.tier is not None and batch:
            host_tokens = {s.seq_id: self.tier.pending_restore_tokens(s) for s in batch}
            plan = self.tier.take_plan(batch)
        self.forward(batch, plan, prefill, host_tokens)
