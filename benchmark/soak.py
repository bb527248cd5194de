"""Soak: thousands of turns through LMDeploy 0.18.0's real scheduler and the
host tier, with cancellations, preemptions and sleep/wakeup cycles, checked
after every step.

    python benchmark/soak.py [--turns 5000] [--seed 0] [--faults SPEC] [--verify] [--json FILE]

The engine is benchmark/sim_engine.py: the real Scheduler, block trie and
HostTier, each rank's real SlotStore over CPU tensors shaped like LMDeploy's
KV pools, and a forward that checks every byte it reads (so a restore that
lands wrong bytes fails the run). On it, sessions arrive and take turns (a
new session or the next message of an open one, its reply decoded token by
token), several in flight at once on a GPU cache too small for them, so
admissions roll back and running sequences are preempted; a running or
waiting turn is cancelled now and then (its session ended, as LMDeploy does
on an abort); and every so often the engine sleeps (LMDeploy's Engine.sleep
with the tier's hook: sessions ended, host index forgotten, the prefix trie
emptied, the rank's store dropped) and wakes with a new store over zeroed pools.

After every step (one admission or one decode forward):
  - the host index's own invariants hold, and each host slot is exactly one
    of free, cached, or pinned, a pin being held only by a restore matched
    and not yet planned (between steps there is none);
  - each rank's ledger has carried out every save the scheduler planned,
    but for those waiting for the next forward, and no other; every cached
    slot's save was planned;
  - the tier keeps no state for sequences that are gone.
At the end: everything ended and every copy drained, LMDeploy's allocator
and the tier are balanced (tests/balance.py), resident memory grew by less
than a bound after the warm-up, and the counters add up (host hits seen by
the forwards = the tier's hit tokens; blocks the scheduler saved = held +
evicted + dropped + forgotten at sleeps; the ranks' saves = the scheduler's less the
saves a sleep dropped unplanned; and two that mostly check the bookkeeping
of cancelled matches: host hits the forwards saw = the tier's hit tokens,
blocks the ranks restored = blocks planned). The byte-checking forward is
the strong check: every restore must land the bytes that were computed.

tests/lmdeploy/test_soak.py runs a short version in CI.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # tests/balance.py

from benchmark.sim_engine import SimEngine  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Turn:
    session: int
    seq: Any
    left: int  # reply tokens still to decode


@dataclass
class SoakCounts:
    steps: int = 0
    turns_started: int = 0
    turns_finished: int = 0
    cancelled: int = 0
    ended_by_sleep: int = 0         # turns in flight when the engine slept (LMDeploy ends their sessions)
    preempted: int = 0
    sleeps: int = 0
    forwards: int = 0
    host_hit_tokens_seen: int = 0
    forgotten_at_sleep: int = 0     # host entries a sleep forgot (the index starts empty)
    evictions_before: int = 0       # of indexes a sleep replaced
    discarded_before: int = 0
    pre_dropped_at_sleep: int = 0   # saves planned but never sent to a rank (a sleep cleared them)
    rank_saved_before: int = 0      # of rank stores a sleep dropped
    rank_restored_before: int = 0
    max_slot_classes: dict = field(default_factory=dict)


class Soak:
    def __init__(self, seed: int = 0, gpu_blocks: int = 40, host_slots: int = 96, block_size: int = 16,
                 max_batches: int = 6, policy: str = "write_through", verify: bool = False, ranks: int = 1):
        self.rng = np.random.default_rng(seed)
        self.eng = SimEngine(num_gpu_blocks=gpu_blocks, host_slots=host_slots, block_size=block_size,
                             policy=policy, max_batches=max_batches, verify=verify, ranks=ranks)
        self.eng.loop.forward = self._forward
        self.tier = self.eng.tier
        self.counts = SoakCounts()
        self.sessions: dict[int, Any] = {}    # open sessions between turns: session id -> its sequence
        self.waiting: list[Turn] = []
        self.running: list[Turn] = []
        self.next_session = 0
        self.system = self.rng.integers(100, 200, size=3 * block_size)  # shared by every new session

    # ----- the engine's work

    def _forward(self, batch: list, plan: Any, prefill: bool, host_tokens: dict) -> None:
        self.counts.host_hit_tokens_seen += sum(host_tokens.values())
        self.counts.forwards += 1
        self.eng.forward(batch, plan)

    def start_turn(self) -> None:
        busy = {t.session for t in self.waiting + self.running}
        idle = [s for s in self.sessions if s not in busy]
        if idle and self.rng.random() < 0.6:
            sid = int(self.rng.choice(idle))
            seq = self.eng.loop.start_turn(sid, self.rng.integers(1000, 30000, size=int(self.rng.integers(4, 40))),
                                           self.sessions[sid])
        else:
            sid, self.next_session = self.next_session, self.next_session + 1
            own = self.rng.integers(1000, 30000, size=int(self.rng.integers(4, 60)))
            seq = self.eng.loop.start_turn(sid, np.concatenate([self.system, own]))
            self.sessions[sid] = seq
        self.waiting.append(Turn(sid, seq, int(self.rng.integers(1, 24))))
        self.counts.turns_started += 1

    def admit(self) -> None:
        batch = self.eng.loop.admit()
        by_seq = {id(t.seq): t for t in self.waiting}
        for seq in batch:
            turn = by_seq[id(seq)]
            self.waiting.remove(turn)
            self.eng.loop.append(seq, self.eng._token(), prefill=True)
            turn.left -= 1
            self._after_token(turn)

    def decode(self) -> None:
        turns = {id(t.seq): t for t in self.running}
        kept, preempted = self.eng.loop.decode([t.seq for t in self.running])
        self.running = []
        for seq in preempted:  # back to waiting, its tokens so far kept
            self.waiting.append(turns[id(seq)])
            self.counts.preempted += 1
        for seq in kept:
            turn = turns[id(seq)]
            self.eng.loop.append(seq, self.eng._token(), prefill=False)
            turn.left -= 1
            self._after_token(turn)

    def _after_token(self, turn: Turn) -> None:
        if turn.left > 0:
            self.running.append(turn)
            return
        turn.seq.finish()
        self.counts.turns_finished += 1
        if self.rng.random() < 0.3:  # the conversation ends
            self._end(turn.session)

    def cancel(self) -> None:
        turns = self.waiting + self.running
        if not turns:
            return
        turn = turns[int(self.rng.integers(len(turns)))]
        self.waiting = [t for t in self.waiting if t is not turn]
        self.running = [t for t in self.running if t is not turn]
        self._end(turn.session)  # an abort: LMDeploy ends the request's session
        self.counts.cancelled += 1

    def _end(self, sid: int) -> None:
        self.eng.scheduler.end_session(sid)
        self.sessions.pop(sid, None)

    def sleep_and_wake(self) -> None:
        """LMDeploy's Engine.sleep with the tier's hook, then a wakeup: the
        rank's store goes with the pools and a new one is built over fresh ones."""
        from lmdeploy.pytorch.engine.engine import Engine
        from lmdeploy_patch import rank_tier

        def end_all() -> None:
            for t in self.waiting + self.running:
                self._end(t.session)
                self.counts.ended_by_sleep += 1
            for sid in list(self.sessions):
                self._end(sid)
            self.waiting, self.running = [], []

        c, ix = self.counts, self.tier.index

        async def executor_sleep(level: int) -> None:
            for i, key in enumerate(self.eng.cache_engines):  # the ranks drop their stores (hooks/model_agent.py)
                w = self.eng.workers[i]
                c.rank_saved_before += w.blocks_saved
                c.rank_restored_before += w.blocks_restored
                assert rank_tier.unregister(key)

        def before_reset() -> None:  # what the tier's sleep hook is about to forget
            c.forgotten_at_sleep += ix.used
            c.evictions_before += ix.evictions
            c.discarded_before += ix.counters()["discarded"]
            c.pre_dropped_at_sleep += len(self.tier._pre)

        fake = SimpleNamespace(_block_new_inputs=lambda: None, _engine_loop=None,
                               _cancel_and_end_all_sessions=lambda: (end_all(), before_reset()),
                               executor=SimpleNamespace(sleep=executor_sleep), scheduler=self.eng.scheduler)
        asyncio.run(Engine.sleep(fake, 1))
        assert self.tier.index.used == 0 and self.tier.index is not ix
        for i, (pool, key) in enumerate(zip(self.eng.pools, self.eng.cache_engines)):  # wakeup: new pools, new stores
            pool.zero_()
            allocation = SimpleNamespace(pools=[SimpleNamespace(tensor=pool, entry_axis=1)])
            self.eng.workers[i] = rank_tier.build_worker_tier(self.eng.scheduler.cache_config, allocation,
                                                              blocks_per_logical=1)
            rank_tier.register(key, self.eng.workers[i])
        self.eng.worker = self.eng.workers[0]
        trie = self.eng.scheduler.block_trie  # the tier's sleep hook emptied it (hooks/engine.py)
        assert all(not root.children for root in trie._roots.values()), "the trie kept blocks over a sleep"
        c.sleeps += 1

    # ----- one step and its checks

    def step(self, new_turns: bool = True) -> None:
        """One step; without new turns (the run's end) the ones in flight drain, fewer cancelled."""
        if new_turns and len(self.waiting) + len(self.running) < 8 and self.rng.random() < 0.5:
            self.start_turn()
        if self.rng.random() < (0.03 if new_turns else 0.01):
            self.cancel()
        if self.waiting:
            self.admit()
        if self.running:
            self.decode()
        self.counts.steps += 1
        self.check_step()

    def slot_classes(self) -> dict[str, int]:
        """Each host slot is exactly one of free, cached (matchable), pinned
        (by a restore matched and not yet planned); checked against the tier."""
        ix = self.tier.index
        ix.check_invariants()
        pinned_by: dict[int, int] = {}
        for pending in self.tier._restores.values():
            for s in pending.slots.tolist():
                pinned_by[s] = pinned_by.get(s, 0) + 1
        classes = {"free": 0, "cached": 0, "pinned": 0}
        for s in range(ix.capacity):
            pins, ready = ix.pins(s), ix.is_ready(s)
            if pins != pinned_by.get(s, 0):
                raise AssertionError(f"slot {s}: {pins} pins, but {pinned_by.get(s, 0)} pending restores hold it")
            classes["pinned" if pins else "cached" if ready else "free"] += 1
        if classes["cached"] + classes["pinned"] != ix.used:
            raise AssertionError(f"slot classes {classes} disagree with the index's {ix.used} used slots")
        return classes

    def check_step(self) -> None:
        classes = self.slot_classes()
        if classes["pinned"]:
            raise AssertionError(f"{classes['pinned']} host slots pinned between steps (every match was planned)")
        for k, v in classes.items():
            self.counts.max_slot_classes[k] = max(self.counts.max_slot_classes.get(k, 0), v)
        # Every save the scheduler planned reached each rank, but for those
        # still waiting for the next forward (pre saves: tails of ended
        # sessions); every cached slot's save was planned.
        waiting = np.zeros(self.tier.index.capacity, dtype=np.int64)
        np.add.at(waiting, np.array([s for s, _ in self.tier._pre], dtype=np.int64), 1)
        cached = np.array([s for s in range(self.tier.index.capacity) if self.tier.index.is_ready(s)], dtype=np.int64)
        for w in self.eng.workers:
            ledger = w.ledger
            off = np.nonzero(ledger._planned - ledger._carried != waiting)[0]
            if len(off):
                s = int(off[0])
                raise AssertionError(f"slot {s}: {ledger._planned[s]} saves planned, {ledger._carried[s]} carried out "
                                     f"by a rank, {waiting[s]} waiting for the next forward")
            if len(cached) and (ledger._planned[cached] == 0).any():
                raise AssertionError("a cached host slot whose save was never planned")
        live = {t.seq.seq_id for t in self.waiting + self.running} | {s.seq_id for s in self.sessions.values()}
        t = self.tier
        for name, kept in (("tails", t._tails), ("released", t._released), ("queried", t._queried),
                           ("restores", t._restores)):
            gone = set(kept) - live
            if gone:
                raise AssertionError(f"the tier keeps {name} for sequences that are gone: {sorted(gone)[:8]}")

    # ----- the end

    def finish(self) -> dict:
        from balance import balance_problems

        for t in self.waiting + self.running:
            self._end(t.session)
        for sid in list(self.sessions):
            self._end(sid)
        self.waiting, self.running = [], []
        self.eng.forward([], self.tier.take_plan([]))  # the last plan (saves of ended sessions' tails)
        for w in self.eng.workers:
            w.before_model(None, None)  # waits for every copy
            w.ledger.settle(wait_all=True)
        problems = balance_problems(self.eng.scheduler, self.tier)
        c, s, ix = self.counts, self.tier.stats, self.tier.index
        ranks = self.eng.workers
        sums = {
            "host hits seen by the forwards = the tier's hit tokens": (c.host_hit_tokens_seen, s.hit_tokens),
            "saved = held + evicted + dropped + forgotten at sleeps": (
                s.blocks_saved, ix.used + ix.evictions + ix.counters()["discarded"] + c.forgotten_at_sleep
                + c.evictions_before + c.discarded_before),
            "restored by the ranks = planned": (sum(w.blocks_restored for w in ranks) + c.rank_restored_before,
                                                s.blocks_restored * len(ranks)),
            "saves by the ranks = planned less those a sleep dropped": (
                sum(w.blocks_saved for w in ranks) + c.rank_saved_before,
                (s.blocks_saved - c.pre_dropped_at_sleep) * len(ranks)),
        }
        wrong = {k: v for k, v in sums.items() if v[0] != v[1]}
        from lmdeploy_patch.rank_tier import local_figures

        host = {**self.tier.metrics(), **local_figures(id(self.eng.scheduler.cache_config))}
        return {"problems": problems, "sums": sums, "wrong": wrong, "counts": c.__dict__, "host": host}


def run(turns: int, seed: int = 0, sleep_every: int = 400, rss_bound_mib: float = 64.0, **kw: Any) -> dict:
    soak = Soak(seed=seed, **kw)
    t0 = time.perf_counter()
    rss_warm: Optional[int] = None
    rss_max = 0
    while soak.counts.turns_started < turns or soak.waiting or soak.running:
        soak.step(new_turns=soak.counts.turns_started < turns)
        if sleep_every and soak.counts.steps % sleep_every == sleep_every - 1:
            soak.sleep_and_wake()
        if soak.counts.steps % 50 == 0:
            if rss_warm is None and soak.counts.turns_started >= turns // 4:
                rss_warm = rss_bytes()  # after the pools and the allocator's arenas have grown
            rss_max = max(rss_max, rss_bytes())
    out = soak.finish()
    growth = (rss_max - rss_warm) / 2**20 if rss_warm else 0.0
    out.update(seconds=round(time.perf_counter() - t0, 1), rss_growth_mib=round(growth, 1),
               rss_bound_mib=rss_bound_mib, rss_ok=growth <= rss_bound_mib)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sleep-every", type=int, default=400, help="steps between sleep/wakeup cycles (0: never)")
    p.add_argument("--policy", default="write_through")
    p.add_argument("--faults", default="", help="HOSTCACHE_FAULTS for the ranks (test-only faults)")
    p.add_argument("--verify", action="store_true", help="host_cache_verify")
    p.add_argument("--ranks", type=int, default=1, help="ranks (tensor-parallel shards) in this process")
    p.add_argument("--rss-bound-mib", type=float, default=64.0)
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.faults:
        os.environ["HOSTCACHE_FAULTS"] = a.faults
    out = run(a.turns, a.seed, a.sleep_every, a.rss_bound_mib, policy=a.policy, verify=a.verify, ranks=a.ranks)
    print(json.dumps({k: out[k] for k in ("counts", "wrong", "problems", "seconds", "rss_growth_mib")}, default=str))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 0 if not out["problems"] and not out["wrong"] and out["rss_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
