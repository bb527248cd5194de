"""CPU replay: real multi-turn conversations through LMDeploy 0.18.0's real
Scheduler and block trie, with the host tier (its real index and copy plans)
or without it; forwards are not executed.

Token counts by tier are exact for this scheduler; times are ESTIMATES from a
cost model (prefill tokens/s, decode step time, copy GB/s), so a run on a
2-core machine says what the tier would do on the GPU the constants describe.

Sessions, two ways LMDeploy is driven:
  stateless (default)  every turn is a new LMDeploy session that resends the
      conversation and ends with its reply, as LMDeploy's api_server (OpenAI
      chat completions) and the pipeline's chat/stream APIs without a session
      do: reuse across turns goes through the prefix cache only.
  interactive  one LMDeploy session per conversation that stays open between
      turns (sequence_start/sequence_end, pipeline sessions): a stopped
      sequence keeps its blocks, partial last block included, until the
      scheduler reclaims them for another request.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .engine_loop import EngineLoop, build_scheduler
from .server_client import ramp_delay


@dataclass
class CostModel:
    prefill_tok_s: float      # prompt tokens computed per second
    decode_step_s: float      # one decode forward of the running batch
    copy_gbps: float          # host <-> GPU copy bandwidth, GB/s
    source: str = ""

    def prefill_s(self, tokens: int) -> float:
        return tokens / self.prefill_tok_s

    def copy_s(self, nbytes: int) -> float:
        return nbytes / (self.copy_gbps * 1e9)


@dataclass
class User:
    """One simulated user walking one conversation, turn by turn."""
    uid: int
    turns: list[tuple[np.ndarray, np.ndarray]]  # (user message ids, reply ids)
    turn: int = 0
    seq: object = None
    arrival: float = 0.0
    first_token_at: Optional[float] = None
    reply_pos: int = 0
    last_token_at: float = 0.0


@dataclass
class ReplayResult:
    requests: int = 0
    sim_seconds: float = 0.0
    tokens_gpu_hit: int = 0
    tokens_host_hit: int = 0
    tokens_recomputed: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0
    bytes_restored: int = 0
    bytes_saved: int = 0
    restore_seconds: float = 0.0
    preemptions: int = 0
    ttft: list = field(default_factory=list)
    itl: list = field(default_factory=list)
    timeline: list = field(default_factory=list)  # (t, gpu hit, host hit, recomputed, host slots used)
    host: dict = field(default_factory=dict)
    wall_seconds: float = 0.0

    def summary(self) -> dict:
        def pct(xs, q):
            return float(np.percentile(xs, q)) if xs else 0.0

        t = max(self.sim_seconds, 1e-9)
        return {
            "requests": self.requests,
            "tokens_gpu_hit": self.tokens_gpu_hit,
            "tokens_host_hit": self.tokens_host_hit,
            "tokens_recomputed": self.tokens_recomputed,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "preemptions": self.preemptions,
            "bytes_restored": self.bytes_restored,
            "bytes_saved": self.bytes_saved,
            "est_restore_seconds": self.restore_seconds,
            "est_seconds": self.sim_seconds,
            "est_ttft_p50_s": pct(self.ttft, 50),
            "est_ttft_p90_s": pct(self.ttft, 90),
            "est_ttft_p99_s": pct(self.ttft, 99),
            "est_itl_p50_s": pct(self.itl, 50),
            "est_itl_p99_s": pct(self.itl, 99),
            "est_requests_per_s": self.requests / t,
            "est_input_tok_s": self.prompt_tokens / t,
            "est_output_tok_s": self.output_tokens / t,
            "host": self.host,
            "wall_seconds": self.wall_seconds,
        }


SESSIONS = ("stateless", "interactive")


class ReplayEngine:
    """LMDeploy's scheduler stepped like its engine loop, time from a cost model."""

    def __init__(self, *, num_gpu_blocks: int, host_slots: int, block_size: int, max_batches: int,
                 kv_block_bytes: int, cost: CostModel, write_policy: str = "write_through",
                 restore_policy: str = "auto"):
        self.scheduler = build_scheduler(num_gpu_blocks, block_size, max_batches, host_slots, write_policy,
                                         kv_block_bytes, restore_policy=restore_policy)
        self.loop = EngineLoop(self.scheduler, self._forward)
        self.tier = self.loop.tier
        self._step: tuple = (None, {})  # (plan, host tokens) of the last forward
        if host_slots > 0 and self.tier is None:
            raise RuntimeError("the host tier did not attach: is lmdeploy-hostcache installed with its .pth?")
        self.bs = block_size
        self.kv_block_bytes = kv_block_bytes
        self.cost = cost

    def run(self, users: list[User], concurrency: int, think_s: float, seed: int,
            progress: Optional[Callable[[int, int], None]] = None, ramp_s: float = 0.0,
            sessions: str = "stateless") -> ReplayResult:
        """ramp_s spreads the first `concurrency` users' arrivals evenly over
        that many seconds (later users start when one finishes); sessions:
        module docstring."""
        if sessions not in SESSIONS:
            raise ValueError(f"sessions must be one of {SESSIONS}, got {sessions!r}")
        if self.tier is not None:  # open sessions continue: their stopped sequences' tails pay
            self.tier.save_stopped_tails = sessions == "interactive"
        return _Replay(self, users, concurrency, think_s, seed, progress, ramp_s, sessions).run()

    def _forward(self, batch: list, plan, prefill: bool, host_tokens: dict) -> None:
        """No model: the plan and host hits are what the step's cost is counted from."""
        self._step = (plan, host_tokens)

    def _plan_bytes(self, plan, res: ReplayResult) -> tuple[int, int]:
        """Counts a forward's copy plan in `res`; returns (bytes restored, bytes saved)."""
        if plan is None:
            return 0, 0
        restore = len(plan.restore_slots) * self.kv_block_bytes
        saves = (len(plan.pre_slots) + len(plan.post_slots)) * self.kv_block_bytes
        res.bytes_restored += restore
        res.bytes_saved += saves
        return restore, saves


class _Replay:
    """One replay: users arriving, thinking and taking turns on one ReplayEngine's clock."""

    def __init__(self, engine: ReplayEngine, users: list[User], concurrency: int, think_s: float, seed: int,
                 progress: Optional[Callable[[int, int], None]], ramp_s: float, sessions: str = "stateless"):
        rng = np.random.default_rng(seed)
        # Drawn up front per (user, turn), so runs that finish turns in a
        # different order (tier off and on) still give every user the same pauses.
        self.think = [rng.exponential(think_s, size=len(u.turns)) if think_s > 0 else np.zeros(len(u.turns))
                      for u in users]
        self.engine, self.loop, self.cost = engine, engine.loop, engine.cost
        self.users, self.progress = users, progress
        self.res = ReplayResult()
        self.now = 0.0
        self.arrivals: list[tuple[float, int]] = []  # (time, uid) of each user's next turn
        self.queue = list(range(len(users)))[::-1]  # users not started yet
        for _ in range(min(concurrency, len(users))):
            uid = self.queue.pop()
            heapq.heappush(self.arrivals, (ramp_delay(uid, concurrency, len(users), ramp_s), uid))
        self.waiting: dict[int, User] = {}  # id(seq) -> user, turns not yet prefilled
        self.running: list = []
        self.owner: dict[int, User] = {}
        self.total_turns = sum(len(u.turns) for u in users)
        self.stateless = sessions == "stateless"
        if engine.tier is not None:
            # No forwards to time and no copies to measure: the restore
            # decision weighs the cost model's figures on the replay's clock.
            engine.tier.decider.assume(engine.cost.copy_gbps * 1e9, engine.cost.prefill_tok_s, lambda: self.now)
        self.session_of: dict[int, int] = {}  # uid -> its LMDeploy session id now
        self.next_session = 0

    def run(self) -> ReplayResult:
        res, wall0 = self.res, time.perf_counter()
        while self.arrivals or self.waiting or self.running:
            while self.arrivals and self.arrivals[0][0] <= self.now:
                self.start_turn(self.users[heapq.heappop(self.arrivals)[1]])
            stepped = self.prefill_step() if self.waiting else False
            if self.running:
                self.decode_step()
                stepped = True
            if stepped:
                used = self.engine.tier.index.used if self.engine.tier else 0
                res.timeline.append((self.now, res.tokens_gpu_hit, res.tokens_host_hit, res.tokens_recomputed, used))
            elif self.arrivals:
                self.now = max(self.now, self.arrivals[0][0])
            elif self.waiting:
                raise RuntimeError("the scheduler admits nothing: the GPU cache is too small for one request")
        res.sim_seconds = self.now
        res.wall_seconds = time.perf_counter() - wall0
        if self.engine.tier is not None:
            res.host = self.engine.tier.metrics()
        return res

    def start_turn(self, user: User) -> None:
        msg, _ = user.turns[user.turn]
        if self.stateless:  # a new session with the whole conversation so far
            prompt = np.concatenate([x for m, r in user.turns[:user.turn] for x in (m, r)] + [msg])
            self.session_of[user.uid], self.next_session = self.next_session, self.next_session + 1
            user.seq = self.loop.start_turn(self.session_of[user.uid], prompt.astype(msg.dtype, copy=False))
        else:
            if user.seq is None:
                self.session_of[user.uid], self.next_session = self.next_session, self.next_session + 1
            user.seq = self.loop.start_turn(self.session_of[user.uid], msg, user.seq)
        user.arrival, user.first_token_at, user.reply_pos = self.now, None, 0
        self.waiting[id(user.seq)] = user
        self.owner[id(user.seq)] = user

    def finish_turn(self, user: User) -> None:
        user.seq.finish()
        self.res.requests += 1
        user.turn += 1
        if self.stateless or user.turn == len(user.turns):
            self.engine.scheduler.end_session(self.session_of[user.uid])
        if user.turn < len(user.turns):
            heapq.heappush(self.arrivals, (self.now + float(self.think[user.uid][user.turn - 1]), user.uid))
        else:
            if self.queue:
                heapq.heappush(self.arrivals, (self.now, self.queue.pop()))
        if self.progress:
            self.progress(self.res.requests, self.total_turns)

    def emit_token(self, seq, prefill: bool) -> None:
        """The forward's sampled token is the reply's next token."""
        user = self.owner[id(seq)]
        _, reply = user.turns[user.turn]
        self.loop.append(seq, int(reply[user.reply_pos]), prefill)
        user.reply_pos += 1
        user.last_token_at = self.now
        self.res.output_tokens += 1
        if user.reply_pos >= len(reply):
            self.finish_turn(user)
        else:
            self.running.append(seq)

    def prefill_step(self) -> bool:
        """One admission forward; False when LMDeploy admitted nothing."""
        res = self.res
        batch = self.loop.admit()
        if not batch:
            return False
        plan, host_hits = self.engine._step
        restore_bytes, save_bytes = self.engine._plan_bytes(plan, res)
        computed = 0
        for seq in batch:
            self.waiting.pop(id(seq), None)
            host = host_hits.get(seq.seq_id, 0)
            res.tokens_host_hit += host
            res.tokens_gpu_hit += seq.num_history_ids - host
            res.tokens_recomputed += seq.num_all_ids - seq.num_history_ids
            res.prompt_tokens += seq.num_all_ids
            computed += seq.num_all_ids - seq.num_history_ids
        # Restores run before the model and the model waits for them; saves
        # delay the next forward (lmdeploy_patch/rank_tier.py): both add here.
        self.now += self.cost.prefill_s(computed) + self.cost.copy_s(restore_bytes + save_bytes)
        res.restore_seconds += self.cost.copy_s(restore_bytes)
        for seq in batch:
            user = self.owner[id(seq)]
            if user.first_token_at is None:
                user.first_token_at = self.now
                res.ttft.append(self.now - user.arrival)
            self.emit_token(seq, prefill=True)
        return True

    def decode_step(self) -> None:
        """One decode forward of everything running; preempted turns wait again."""
        res = self.res
        keep, preempted = self.loop.decode(self.running)
        for s in preempted:  # back to waiting, its tokens so far kept
            res.preemptions += 1
            self.waiting[id(s)] = self.owner[id(s)]
        restore_bytes, save_bytes = self.engine._plan_bytes(self.engine._step[0], res)
        self.now += self.cost.decode_step_s + self.cost.copy_s(restore_bytes + save_bytes)
        self.running = []
        for seq in keep:
            res.itl.append(self.now - self.owner[id(seq)].last_token_at)
            self.emit_token(seq, prefill=False)
