"""The replay's store model (benchmark/store_model.py) against a real
Mooncake Store (cluster.py) on one small workload: two engines behind a
router without affinity (benchmark/router_replay.py), once as the replay
runs them (LMDeploy's real scheduler, no ranks, the model store) and once
with real ranks and a real store (benchmark/sim_engine.py: host pools of
CPU tensors, copies made by the core, every byte a forward reads checked);
writes both runs' per-turn token counts as JSON; then the same real run
against a store too small for the workload (a full store). Run inside a private
network namespace (test_store_model.py does).

    python tests/store/model_check.py --out FILE.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]

from cluster import Cluster  # noqa: E402

# Small enough for seconds on 2 cores; the GPU caches hold a fraction of the conversations.
CONVERSATIONS, TURNS, BLOCK, GPU_BLOCKS, HOST_SLOTS = 8, 3, 16, 24, 64


def conversations(seed: int = 7) -> list:
    rng = np.random.default_rng(seed)
    return [[(rng.integers(3, 30000, int(rng.integers(20, 60))), rng.integers(3, 30000, int(rng.integers(4, 12))))
             for _ in range(TURNS)] for _ in range(CONVERSATIONS)]


def replay_engines(capacity: int | None = None) -> list:
    from benchmark.replay import CostModel, ReplayEngine
    from benchmark.store_model import ModelStore, attach_model_store

    store = ModelStore(capacity)
    out = []
    for _ in range(2):
        e = ReplayEngine(num_gpu_blocks=GPU_BLOCKS, host_slots=HOST_SLOTS, block_size=BLOCK, max_batches=4,
                         kv_block_bytes=2 * BLOCK * 8, cost=CostModel(1e4, 1e-3, 10.0), restore_policy="always")
        attach_model_store(e, store)
        out.append(e)
    return out


def real_engines(config: Path, row_bytes: int = 8) -> list:
    from benchmark.sim_engine import SimEngine

    out = []
    for _ in range(2):
        e = SimEngine(num_gpu_blocks=GPU_BLOCKS, host_slots=HOST_SLOTS, block_size=BLOCK, layers=2,
                      row_bytes=row_bytes, restore_policy="always", store=str(config))
        e.tier.save_stopped_tails = False  # as the replay's stateless sessions
        out.append(e)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from benchmark.router_replay import run

    logs = Path(args.out).parent / "model-check"
    logs.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(logs)
    try:
        config = cluster.config(logs / "mooncake.json", lookup_budget_ms=10_000)
        convs = conversations()
        real = real_engines(config)
        result = {"real": run(real, convs, seed=3), "model": run(replay_engines(), convs, seed=3),
                  # a negative control: a model store that keeps 8 objects
                  "model_small": run(replay_engines(capacity=8), convs, seed=3)}
        for e in real:
            e.end_all()
    finally:
        cluster.stop()
    # A full store: a 16 MB node (Mooncake's least) and 256 KiB blocks; puts fail while it evicts.
    logs = logs / "full"
    logs.mkdir(exist_ok=True)
    cluster = Cluster(logs, node_bytes="16 MB")
    try:
        full = real_engines(cluster.config(logs / "mooncake.json", lookup_budget_ms=10_000), row_bytes=8192)
        result["full"] = run(full, convs, seed=3)
        result["full"]["store_metrics"] = [e.tier.store.metrics() for e in full]
        for e in full:
            e.end_all()
    finally:
        cluster.stop()
    Path(args.out).write_text(json.dumps(result, default=int))
    return 0


if __name__ == "__main__":
    sys.exit(main())
