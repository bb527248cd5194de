"""Host slots through a real Mooncake Store (tests/store/cluster.py) and
back, between two processes, for LMDeploy's KV layouts of quant policies 0,
8 and 4; writes what was found as JSON. Run inside a private network
namespace (test_mooncake_store.py does).

    python tests/store/roundtrip.py --out FILE.json

The writer process fills a pool, saves its blocks into host slots, registers
the pool with the store and puts every slot, then exits: its own client goes
away, the objects stay on the storage node. A second process, with its own
zeroed pool, finds the keys, gets them into other slots and restores them
into other blocks: every byte must equal the writer's. It also asks for a
key nobody put and for an object with the wrong size: both must be misses.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

BLOCKS = 8
DTYPES = {"bf16": 0, "int8": 8, "int4": 4}  # layout -> LMDeploy quant policy


def _pool(dtype: str, seed: int):
    from kv_layouts import KVPool, KVShape
    from lmdeploy_hostcache import HostCacheConfig, SlotStore

    kv = KVPool(KVShape(dtype=dtype), 2 * BLOCKS, seed=seed)
    cfg = HostCacheConfig(capacity_bytes=2 * BLOCKS * kv.shape.layers * kv.shape.layer_block_bytes() + (1 << 16),
                          reserve_bytes=0)
    return kv, SlotStore.from_tensors(cfg, kv.tensors, block_dim=kv.block_dim)


def write(config: str, outdir: Path) -> dict:
    from lmdeploy_hostcache.mooncake_store import MooncakeStore, StoreConfig

    store = MooncakeStore(StoreConfig.from_file(config))
    out = {}
    for dtype in DTYPES:
        kv, slots = _pool(dtype, seed=1)
        assert slots.offload(np.arange(BLOCKS), np.arange(BLOCKS)).wait()
        store.register(slots.memory_ranges())
        keys = [f"test/{dtype}/{i}" for i in range(BLOCKS)]
        ok = [False] * BLOCKS
        deadline = time.monotonic() + 20
        while not all(ok) and time.monotonic() < deadline:  # the storage node may still be mounting its segment
            todo = [i for i in range(BLOCKS) if not ok[i]]
            for i, done in zip(todo, store.put([keys[i] for i in todo], [slots.slot_address(i) for i in todo],
                                               slots.slot_bytes)):
                ok[i] = done
            if not all(ok):
                time.sleep(0.2)
        np.save(outdir / f"{dtype}.npy", kv.tensors[0][:, :BLOCKS].numpy())
        out[dtype] = {"put": ok, "slot_bytes": slots.slot_bytes}
        store.unregister(slots.memory_ranges())  # before the pool goes: a later one may reuse its addresses
    store.close()
    return out


def read(config: str, outdir: Path) -> dict:
    import torch

    from lmdeploy_hostcache.mooncake_store import MooncakeStore, StoreConfig

    store = MooncakeStore(StoreConfig.from_file(config))
    out = {}
    for dtype in DTYPES:
        kv, slots = _pool(dtype, seed=2)
        kv.tensors[0].zero_()
        store.register(slots.memory_ranges())
        keys = [f"test/{dtype}/{i}" for i in range(BLOCKS)]
        exists = store.exists(keys + [f"test/{dtype}/nobody"])
        # into other slots, in reverse, then into other blocks
        into = list(range(2 * BLOCKS - 1, BLOCKS - 1, -1))
        got = store.get(keys, [slots.slot_address(s) for s in into], slots.slot_bytes)
        assert slots.restore(np.array(into), np.arange(BLOCKS, 2 * BLOCKS)).wait()
        saved = np.load(outdir / f"{dtype}.npy")
        restored = kv.tensors[0][:, BLOCKS:].numpy()
        missing = store.get([f"test/{dtype}/nobody"], [slots.slot_address(0)], slots.slot_bytes)
        wrong_size = store.get(keys[:1], [slots.slot_address(0)], slots.slot_bytes // 2)
        out[dtype] = {"exists": exists, "got": got, "equal": bool(np.array_equal(saved, restored)),
                      "differ_before": bool((saved != 0).any()), "missing": missing, "wrong_size": wrong_size}
        store.unregister(slots.memory_ranges())
    store.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--role", choices=["main", "write", "read"], default="main")
    p.add_argument("--config")
    a = p.parse_args()
    outdir = Path(a.out).parent
    if a.role != "main":
        result = (write if a.role == "write" else read)(a.config, outdir)
        Path(a.out).write_text(json.dumps(result))
        return 0
    from cluster import Cluster

    cluster = Cluster(outdir)  # stops what it started if it cannot come up
    result: dict = {}
    try:
        config = str(cluster.config(outdir / "mooncake.json"))
        for role in ("write", "read"):  # two processes, one after the other
            done = subprocess.run([sys.executable, __file__, "--role", role, "--config", config,
                                   "--out", str(outdir / f"{role}.json")], capture_output=True, text=True, timeout=120)
            if done.returncode:
                raise RuntimeError(f"{role} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            result[role] = json.loads((outdir / f"{role}.json").read_text())
    finally:
        cluster.stop()
    Path(a.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
