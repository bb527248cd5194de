"""Load or recompute: whether restoring a host hit is faster than computing
its tokens again, decided per admission (scheduler_tier.continue_match).

  restore    = backlog + bytes / copy bandwidth
  recompute  = tokens / prefill throughput

- copy bandwidth: one rank's host-to-GPU restore rate, measured when its
  host pool is built (rank_tier.calibrate_restore); bytes are one rank's
  share, since ranks copy in parallel.
- backlog: what the restore stream still has to copy for earlier
  admissions, modelled as a queue at that bandwidth (`busy_until`, booked
  when a restore is chosen, given back when LMDeploy rolls the admission
  back): the restore of this admission starts behind it.
- prefill throughput: tokens per second of this engine's own prefill
  forwards, as the ranks time them (rank_tier.WorkerTier), a token-weighted
  moving average. Until MIN_SAMPLES forwards are timed it is
  DEFAULT_PREFILL_TOK_S, low on purpose: a recompute then looks expensive
  and the tier restores, as `always` does (a wrong recompute costs GPU time
  nobody sees; a wrong restore costs a copy).

Both costs grow linearly with the hit, and the backlog is paid once, so the
prefix that pays off is the whole hit or none of it: restoring k blocks
saves k x (recompute - restore per block) - backlog, largest at k = all when
it is positive at all. Without a bandwidth (ranks in other processes, whose
figures this process cannot read) `auto` restores.

Policies (host_cache_restore_policy): auto (default), always, never.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from .settings import RESTORE_POLICIES

# Prefill tokens/s assumed before the engine has timed its own: below any GPU
# LMDeploy serves on (an H100 prefills an 8B model at ~10^4 tokens/s).
DEFAULT_PREFILL_TOK_S = 1000.0
MIN_SAMPLES = 4
# Weight of the newest sample's tokens against the history's, per token.
EWMA_TOKENS = 65536.0


@dataclass
class DecisionStats:
    restores_chosen: int = 0        # admissions whose host hit was restored
    recomputes_chosen: int = 0      # admissions whose host hit was recomputed (auto's estimate, or never)
    recompute_chosen_tokens: int = 0
    est_saved_seconds: float = 0.0  # what the choices made were estimated to save over the other choice
    est_lost_seconds: float = 0.0   # what they were estimated to cost (always, or before the figures are measured)

    def add(self, restore: bool, tokens: int, gain: float) -> None:
        if restore:
            self.restores_chosen += 1
        else:
            self.recomputes_chosen += 1
            self.recompute_chosen_tokens += tokens
        if gain >= 0:
            self.est_saved_seconds += gain
        else:
            self.est_lost_seconds -= gain


class RestoreDecider:
    def __init__(self, policy: str, block_bytes_per_rank: int, block_size: int,
                 clock: Callable[[], float] = time.monotonic):
        if policy not in RESTORE_POLICIES:
            raise ValueError(f"host_cache_restore_policy must be one of {RESTORE_POLICIES}, got {policy!r}")
        self.policy = policy
        self.block_bytes = block_bytes_per_rank
        self.block_size = block_size
        self.clock = clock
        self.copy_bytes_per_s: Optional[float] = None
        self.prefill_tok_s = DEFAULT_PREFILL_TOK_S
        self.samples = 0
        self._weight = 0.0
        self.busy_until = 0.0
        self.stats = DecisionStats()
        # seq_id -> (restored?, tokens, estimated gain, seconds of restore
        # stream booked) of an admission not yet run: an admission LMDeploy
        # rolls back is asked again, and must count once.
        self._pending: dict[int, tuple[bool, int, float, float]] = {}

    # ----- what the engine measured

    def set_copy_bandwidth(self, bytes_per_s: Optional[float]) -> None:
        if bytes_per_s is not None and bytes_per_s > 0:
            self.copy_bytes_per_s = float(bytes_per_s)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """One timed prefill forward of `tokens` tokens."""
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        if self.samples == 0:
            self.prefill_tok_s, self._weight = rate, float(tokens)
        else:
            # Token-weighted: a 4-token forward says little about a 4K-token one.
            w = min(self._weight, EWMA_TOKENS)
            self.prefill_tok_s = (self.prefill_tok_s * w + rate * tokens) / (w + tokens)
            self._weight = w + tokens
        self.samples += 1

    def assume(self, copy_bytes_per_s: float, prefill_tok_s: float, clock: Callable[[], float]) -> None:
        """Figures and a clock from elsewhere (the CPU replay's cost model and
        simulated time), as if measured."""
        self.copy_bytes_per_s, self.prefill_tok_s = float(copy_bytes_per_s), float(prefill_tok_s)
        self.samples, self._weight, self.clock = MIN_SAMPLES, EWMA_TOKENS, clock

    @property
    def learned(self) -> bool:
        """Enough prefills timed for the learned rate to stand."""
        return self.samples >= MIN_SAMPLES

    @property
    def measured(self) -> bool:
        return self.copy_bytes_per_s is not None and self.learned

    # ----- the decision

    def backlog_s(self) -> float:
        return max(0.0, self.busy_until - self.clock())

    def estimate(self, blocks: int, tokens: int) -> tuple[float, float]:
        """(restore seconds, recompute seconds) for a hit of `blocks` slots
        holding `tokens` tokens; restore is inf without a bandwidth."""
        recompute = tokens / (self.prefill_tok_s if self.learned else DEFAULT_PREFILL_TOK_S)
        if self.copy_bytes_per_s is None:
            return float("inf"), recompute
        return self.backlog_s() + blocks * self.block_bytes / self.copy_bytes_per_s, recompute

    def restore_blocks(self, seq_id: int, blocks: int, tokens: int) -> int:
        """How many of seq_id's hit's leading `blocks` slots to restore: all
        or none (module docstring). The decision counts once the sequence
        runs (commit), or not at all (rollback)."""
        self.rollback(seq_id)  # a retried admission replaces what it had asked
        if blocks <= 0:
            return 0
        restore, recompute = self.estimate(blocks, tokens)
        if self.policy == "never":
            chosen = False
        elif self.policy == "always" or not self.measured:
            chosen = True
        else:
            chosen = restore <= recompute
        # Only an estimate from measured figures says what a choice gained or
        # cost (before that, recompute is priced at the placeholder rate).
        known = restore != float("inf") and self.measured
        gain = (recompute - restore if chosen else restore - recompute) if known and self.policy != "never" else 0.0
        booked = 0.0
        if chosen and self.copy_bytes_per_s is not None:
            # Booked now, so the next admission of this pass queues behind it.
            booked = blocks * self.block_bytes / self.copy_bytes_per_s
            self.busy_until = max(self.busy_until, self.clock()) + booked
        self._pending[seq_id] = (chosen, tokens, gain, booked)
        return blocks if chosen else 0

    def commit(self, seq_id: int) -> None:
        pending = self._pending.pop(seq_id, None)
        if pending is not None:
            self.stats.add(pending[0], pending[1], pending[2])

    def rollback(self, seq_id: int) -> None:
        pending = self._pending.pop(seq_id, None)
        if pending is not None and pending[3]:
            self.busy_until = max(self.clock(), self.busy_until - pending[3])

    def reset(self) -> None:
        """The engine slept: nothing is queued, nothing pending."""
        self._pending.clear()
        self.busy_until = 0.0

    def metrics(self) -> dict:
        s = self.stats
        return {
            "host_restores_chosen": s.restores_chosen, "host_recomputes_chosen": s.recomputes_chosen,
            "host_recompute_chosen_tokens": s.recompute_chosen_tokens,
            "host_restore_est_saved_seconds": s.est_saved_seconds,
            "host_restore_est_lost_seconds": s.est_lost_seconds,
            "host_copy_bytes_per_second": self.copy_bytes_per_s or 0.0,
            "host_prefill_tokens_per_second": self.prefill_tok_s if self.learned else 0.0,
        }
