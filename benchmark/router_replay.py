"""Engines behind a router without session affinity: every turn of every
conversation goes to an engine drawn at random (seeded per conversation and
turn), as a load balancer does. Each engine is LMDeploy 0.18.0's real
scheduler with (or without) the host tier, stepped by benchmark.engine_loop;
with a store, the engines' host tiers share it (benchmark/store_model.py in
the replay, a real Mooncake Store in tests/store/test_store_model.py).

Turns are served one at a time, in rounds (the first turn of every
conversation, then the second, ...), so that between two turns of one
conversation every other conversation had its turn: the GPU caches evict,
and only what a tier kept serves the next turn. After each turn the engines'
puts are let finish (the model store's assumption: a put lands before a
later turn looks it up).

Counted per engine and in total: prompt tokens served from the GPU cache,
from host memory (this engine's own pool), from the store (fetched into
host memory by the match), and recomputed; bytes over the network (store
reads and writes). Times are not modelled here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class EngineTokens:
    requests: int = 0
    prompt: int = 0
    gpu: int = 0
    host: int = 0
    store: int = 0
    recomputed: int = 0
    network_bytes_read: int = 0
    network_bytes_written: int = 0
    per_turn: list = field(default_factory=list)  # (conversation, turn, gpu, host, store, recomputed)

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in ("requests", "prompt", "gpu", "host", "store", "recomputed",
                                               "network_bytes_read", "network_bytes_written")}


def route(seed: int, conversation: int, turn: int, engines: int) -> int:
    """The engine a turn goes to: the same for every run of one seed."""
    return int(np.random.default_rng([seed, conversation, turn]).integers(engines))


def serve_turn(engine: Any, session_id: int, prompt: np.ndarray, reply: np.ndarray) -> tuple[int, int, int, int]:
    """One stateless turn on `engine` (its .loop, .tier, .scheduler): the
    prompt prefilled, the reply decoded token by token, the session ended.
    Returns (GPU, host, store, recomputed) prompt tokens."""
    loop, tier = engine.loop, engine.tier
    store = tier.store if tier is not None else None
    fetched = store.hit_tokens if store is not None else 0
    seen: dict = {}
    forward = loop.forward

    def counting(batch, plan, prefill, host_tokens):
        seen.update(host_tokens)
        forward(batch, plan, prefill, host_tokens)

    loop.forward = counting
    try:
        seq = loop.start_turn(session_id, prompt)
        batch = loop.admit()
        if seq not in batch:
            raise RuntimeError("the engine did not admit a lone request: its GPU cache is too small for it")
        restored = seen.get(seq.seq_id, 0)
        cached = seq.num_history_ids
        recomputed = seq.num_all_ids - cached
        from_store = (store.hit_tokens - fetched) if store is not None else 0
        loop.append(seq, int(reply[0]), prefill=True)
        for token in reply[1:]:
            kept, preempted = loop.decode([seq])
            if preempted:
                raise RuntimeError("a lone request was preempted: the GPU cache is too small for it")
            loop.append(seq, int(token), prefill=False)
        seq.finish()
        engine.scheduler.end_session(session_id)
    finally:
        loop.forward = forward
    # Store hits are restored with the host hits (or recomputed by the restore policy).
    from_store = min(from_store, restored)
    return cached - restored, restored - from_store, from_store, recomputed


# Seconds between two turns on the replay's clock (a user reads and types):
# what the restore decision sees of time passing (its restore stream drains).
TURN_S = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(engines: list, conversations: list[list[tuple[np.ndarray, np.ndarray]]], seed: int,
        clock: Clock | None = None) -> dict:
    """Every conversation's turns, routed; per-engine and total token counts.
    `clock` (the engines' restore decisions read it) advances TURN_S a turn."""
    counts = [EngineTokens() for _ in engines]
    session = 0
    rounds = max(len(c) for c in conversations)
    for t in range(rounds):
        for c, turns in enumerate(conversations):
            if t >= len(turns):
                continue
            if clock is not None:
                clock.now += TURN_S
            prompt = np.concatenate([x for m, r in turns[:t] for x in (m, r)] + [turns[t][0]])
            e = route(seed, c, t, len(engines))
            gpu, host, store, recomputed = serve_turn(engines[e], session, prompt.astype(np.int64), turns[t][1])
            session += 1
            n = counts[e]
            n.requests += 1
            n.prompt += len(prompt)
            n.gpu, n.host, n.store, n.recomputed = n.gpu + gpu, n.host + host, n.store + store, n.recomputed + recomputed
            n.per_turn.append((c, t, gpu, host, store, recomputed))
            for engine in engines:  # the model store's assumption (module docstring)
                tier = engine.tier
                if tier is not None and tier.store is not None and not tier.store.drain(tier.index, tier._ledgers(),
                                                                                        saves=True):
                    raise RuntimeError("the store's puts did not finish within 10 s of a turn")
    for engine, n in zip(engines, counts):
        tier = engine.tier
        if tier is not None and tier.store is not None:
            figures = tier.store.metrics()
            n.network_bytes_read = figures["host_store_bytes_read"]
            n.network_bytes_written = figures["host_store_bytes_written"]
    total = {k: sum(n.summary()[k] for n in counts) for k in counts[0].summary()}
    return {"engines": [n.summary() for n in counts], "total": total,
            "per_turn": [n.per_turn for n in counts]}
