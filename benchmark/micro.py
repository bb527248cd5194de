"""Microbenchmarks of the host tier's core: prefix index and copy engine.

    python benchmark/micro.py --json results/micro.json [--quick]

Figures (all in one run, so ratios compare like with like):
  index_{match,insert,evict}_us_{1k,8k,32k,128k}  a match from Python as LMDeploy's scheduler
      side makes it at admission (TierIndex.match with pins, and their release), and the
      core index's insert/evict of a whole prompt (64-token blocks)
  index_restore_settle_us_*   what the scheduler side adds per host hit when it takes the
      plan: the restore begun and settled in the index (begin_restore + restored)
  index_match_core_us_*       the same match without the Python call around it
  python_dict_match_us_*      a plain Python chained-hash dict (nano-vllm style, C xxhash)
  index_match_speedup_vs_python_*
  cpu_verified_{restore,offload}_gbps_<dtype>, cpu_verified_vs_plain_restore_<dtype>
      the same copies with what host_cache_verify adds: slot checksums (save completed, hit
      matched) and the restored blocks read back and hashed; gpu_verified_* the same on a GPU
  cpu_{restore,offload}_gbps_<dtype>, cpu_memcpy_gbps_<dtype>, cpu_restore_vs_memcpy[_<dtype>]
      a 64-block restore/offload of a Llama-3-8B-shaped cache in CPU memory, through the
      SlotStore calls a rank makes (lmdeploy_patch/rank_tier.py), against one
      single-threaded memcpy of the same bytes
  gpu_*  (GPU only) the same SlotStore restore/offload of 64 blocks, bf16 and int4, kernel
      and memcpy paths, one copy stream busy and both (gpu_both_streams_gbps_*: a restore
      and a save at once), against one large pinned cudaMemcpy of the same bytes; the pool
      pinned eagerly (gpu_pin_method_*: registered or pinned allocations)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch
import xxhash

from lmdeploy_hostcache import ROOT_KEY, GiB, HostCacheConfig, SlotStore, _core, build_info

BLOCK = 64
# Llama-3-8B shape: 32 layers, 8 KV heads, head dim 128. Bytes of one layer's
# 64-token block in LMDeploy's packed pool (K, V and for int4 their
# scale/zero rows in the model dtype), from the 0.18 wheel's BlockCachePlan.
LAYERS = 32
LAYER_BLOCK_BYTES = {"bf16": 8 * 2**20 // LAYERS, "int4": (2 * 2**20 + 2**17) // LAYERS}
SIZES = {"1k": 1024, "8k": 8192, "32k": 32768, "128k": 131072}


def median_us(fn: Callable[[], object], reps: int, setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(reps):
        if setup:
            setup()
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


class PyChainedDict:
    """The comparison: a chained-hash prefix dict in plain Python (as in
    nano-vllm's block manager): xxh64 over parent key + token bytes, then a
    dict lookup and an exact token check per block."""

    def __init__(self, block: int):
        self.block, self.d = block, {}

    def _key(self, parent: int, blk: np.ndarray) -> int:
        return xxhash.xxh64(parent.to_bytes(8, "little") + blk.tobytes()).intdigest()

    def insert(self, tokens: np.ndarray) -> None:
        parent = 0
        for i in range(len(tokens) // self.block):
            blk = tokens[i * self.block:(i + 1) * self.block]
            h = self._key(parent, blk)
            self.d[h] = (parent, blk.tolist())
            parent = h

    def match(self, tokens: np.ndarray) -> int:
        parent, n = 0, 0
        for i in range(len(tokens) // self.block):
            blk = tokens[i * self.block:(i + 1) * self.block]
            h = self._key(parent, blk)
            e = self.d.get(h)
            if e is None or e[0] != parent or e[1] != blk.tolist():
                break
            n, parent = n + 1, h
        return n


def bench_index(quick: bool) -> dict:
    out = {}
    rng = np.random.default_rng(0)
    for name, n in SIZES.items():
        blocks = n // BLOCK
        tokens = rng.integers(0, 128_000, size=n, dtype=np.int32)
        reps = (20 if quick else 200) if n <= 32768 else (5 if quick else 50)
        holder: dict = {}

        def fresh_index():
            holder["ix"] = _core.PrefixIndex(blocks + 8, BLOCK)

        out[f"index_insert_us_{name}"] = median_us(lambda: holder["ix"].insert_chain(ROOT_KEY, 0, tokens), reps,
                                                   fresh_index)

        def filled_index():
            fresh_index()
            holder["ix"].insert_chain(ROOT_KEY, 0, tokens)

        out[f"index_evict_us_{name}"] = median_us(lambda: holder["ix"].evict(blocks), reps, filled_index)
        filled_index()
        ix = holder["ix"]
        assert ix.match_count(ROOT_KEY, 0, tokens) == blocks
        out[f"index_match_core_us_{name}"] = median_us(lambda: ix.match_count(ROOT_KEY, 0, tokens), reps * 5)

        # What the scheduler side does per host hit (lmdeploy_patch/scheduler_tier.py):
        # a pinning match at admission; the restore begun and settled when the plan is taken.
        tier = _core.TierIndex(blocks + 8, BLOCK)
        parent = ROOT_KEY
        for b in range(blocks):
            _, parent, slot = tier.reserve(parent, 0, tokens[b * BLOCK:(b + 1) * BLOCK])
            tier.saved(slot, True)

        def engine_match():
            _, slots = tier.match(ROOT_KEY, 0, tokens, True)
            tier.release(slots)
            return len(slots)

        assert engine_match() == blocks
        out[f"index_match_us_{name}"] = median_us(engine_match, reps * 5)
        pinned: dict = {}

        def pin_match():
            pinned["slots"] = tier.match(ROOT_KEY, 0, tokens, True)[1]

        def settle():
            tier.begin_restore(pinned["slots"], True)
            tier.restored(pinned["slots"], True, True)

        out[f"index_restore_settle_us_{name}"] = median_us(settle, reps * 5, pin_match)
        tier.check_invariants()

        py = PyChainedDict(BLOCK)
        py.insert(tokens)
        assert py.match(tokens) == blocks
        out[f"python_dict_match_us_{name}"] = median_us(lambda: py.match(tokens), max(3, reps // 2))
        out[f"index_match_speedup_vs_python_{name}"] = out[f"python_dict_match_us_{name}"] / out[f"index_match_us_{name}"]
    return out


def memcpy_gbps(nbytes: int, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8).fill_(2)
    ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)  # warm
    us = median_us(lambda: ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes), reps)
    return nbytes / us / 1e3


def bench_cpu_copy(dtype: str, reps: int, blocks: int = 64) -> dict:
    lbb = LAYER_BLOCK_BYTES[dtype]
    pool = torch.empty((LAYERS, 2 * blocks, lbb), dtype=torch.uint8).fill_(3)
    cfg = HostCacheConfig(capacity_bytes=blocks * LAYERS * lbb, cpu_workers=os.cpu_count() or 2, reserve_bytes=0)
    store = SlotStore.from_tensors(cfg, [pool], block_dim=1)
    nbytes = blocks * store.slot_bytes
    slots, src, dst = np.arange(blocks, dtype=np.uint32), np.arange(blocks), np.arange(blocks, 2 * blocks)
    assert store.offload(slots, src).wait()  # faults the pool's pages in

    def offload():
        assert store.offload(slots, src).wait()

    off_us = median_us(offload, reps)

    def restore():
        assert store.restore(slots, dst).wait()

    restore()
    res_us = median_us(restore, reps)
    ver_off_us, ver_res_us = verified_us(store, offload, restore, slots, dst, reps)
    mc = memcpy_gbps(nbytes, reps)
    res = {f"cpu_offload_gbps_{dtype}": nbytes / off_us / 1e3, f"cpu_restore_gbps_{dtype}": nbytes / res_us / 1e3,
           f"cpu_memcpy_gbps_{dtype}": mc, f"cpu_verified_offload_gbps_{dtype}": nbytes / ver_off_us / 1e3,
           f"cpu_verified_restore_gbps_{dtype}": nbytes / ver_res_us / 1e3}
    res[f"cpu_verified_vs_plain_restore_{dtype}"] = res_us / ver_res_us
    res[f"cpu_restore_vs_memcpy_{dtype}"] = res[f"cpu_restore_gbps_{dtype}"] / mc
    res[f"cpu_offload_vs_memcpy_{dtype}"] = res[f"cpu_offload_gbps_{dtype}"] / mc
    return res


def verified_us(store: SlotStore, offload: Callable[[], None], restore: Callable[[], None], slots: np.ndarray,
                blocks: np.ndarray, reps: int) -> tuple[float, float]:
    """What host_cache_verify adds (lmdeploy_patch/slot_ledger.py): a save
    is checksummed from its slot once it completes; a restore has its slots
    checked when matched and its blocks, read back, after it lands."""
    def verified_offload():
        offload()
        for s in slots.tolist():
            store.slot_checksum(s)

    def verified_restore():
        for s in slots.tolist():
            store.slot_checksum(s)
        restore()
        for b in blocks.tolist():
            store.block_checksum(b)

    verified_restore()
    return median_us(verified_offload, reps), median_us(verified_restore, reps)


def bench_gpu_copy(dtype: str, path: str, reps: int, blocks: int = 64) -> dict:
    """64-block restores and offloads, one direction at a time (one copy
    stream busy) and both at once (the restore and the save stream together,
    as while serving), on an eagerly pinned pool with warm copy lists."""
    lbb = LAYER_BLOCK_BYTES[dtype]
    pool = torch.empty((LAYERS, 3 * blocks, lbb), dtype=torch.uint8, device="cuda").fill_(3)
    cfg = HostCacheConfig(capacity_bytes=2 * blocks * LAYERS * lbb, pin="eager", copy_path=path, reserve_bytes=0)
    store = SlotStore.from_tensors(cfg, [pool], block_dim=1)
    stats = store.stats()
    assert stats["pinned"], f"host pool not pinned: {stats['pin_error']}"
    nbytes = blocks * store.slot_bytes
    slots, src, dst = np.arange(blocks, dtype=np.uint32), np.arange(blocks), np.arange(blocks, 2 * blocks)
    slots2, src2 = np.arange(blocks, 2 * blocks, dtype=np.uint32), np.arange(2 * blocks, 3 * blocks)
    torch.cuda.synchronize()
    assert store.offload(slots, src).wait() and store.offload(slots2, src2).wait()

    def offload():
        assert store.offload(slots, src).wait()

    off_us = median_us(offload, reps)

    def restore():
        assert store.restore(slots, dst).wait()

    restore()
    res_us = median_us(restore, reps)

    def both():  # different slots and blocks: nothing orders one after the other
        a, b = store.restore(slots, dst), store.offload(slots2, src2)
        assert a.wait() and b.wait()

    both()
    both_us = median_us(both, reps)
    engine = store.stats()["copy_engine"]
    key = f"{dtype}_{path}"
    out = {f"gpu_offload_gbps_{key}": nbytes / off_us / 1e3, f"gpu_restore_gbps_{key}": nbytes / res_us / 1e3,
           f"gpu_both_streams_gbps_{key}": 2 * nbytes / both_us / 1e3,
           f"gpu_engine_{key}": engine, f"gpu_pin_method_{key}": stats["pin_method"], "_bytes": nbytes}
    if path == "kernel":
        ver_off_us, ver_res_us = verified_us(store, offload, restore, slots, dst, reps)
        out[f"gpu_verified_offload_gbps_{dtype}"] = nbytes / ver_off_us / 1e3
        out[f"gpu_verified_restore_gbps_{dtype}"] = nbytes / ver_res_us / 1e3
        out[f"gpu_verified_vs_plain_restore_{dtype}"] = res_us / ver_res_us
    return out


def pinned_copy_gbps(nbytes: int, reps: int) -> tuple[float, float]:
    """One large pinned cudaMemcpy each way: the physical limit we compare to."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()

    def h2d():
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()

    def d2h():
        host.copy_(dev, non_blocking=True)
        torch.cuda.synchronize()

    return nbytes / median_us(h2d, reps) / 1e3, nbytes / median_us(d2h, reps) / 1e3


def bench_gpu(quick: bool) -> dict:
    reps = 5 if quick else 20
    out: dict = {}
    for dtype in ("bf16", "int4"):
        best_restore, best_offload = 0.0, 0.0
        nbytes = 0
        for path in ("kernel", "memcpy"):
            r = bench_gpu_copy(dtype, path, reps)
            nbytes = r.pop("_bytes")
            out.update(r)
            best_restore = max(best_restore, r[f"gpu_restore_gbps_{dtype}_{path}"])
            best_offload = max(best_offload, r[f"gpu_offload_gbps_{dtype}_{path}"])
        h2d, d2h = pinned_copy_gbps(nbytes, reps)
        out[f"gpu_pinned_h2d_gbps_{dtype}"], out[f"gpu_pinned_d2h_gbps_{dtype}"] = h2d, d2h
        for path in ("kernel", "memcpy"):
            out[f"gpu_restore_vs_pinned_copy_{dtype}_{path}"] = out[f"gpu_restore_gbps_{dtype}_{path}"] / h2d
            out[f"gpu_offload_vs_pinned_copy_{dtype}_{path}"] = out[f"gpu_offload_gbps_{dtype}_{path}"] / d2h
        out[f"gpu_restore_vs_pinned_copy_{dtype}"] = best_restore / h2d
        out[f"gpu_offload_vs_pinned_copy_{dtype}"] = best_offload / d2h
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(_core.total_ram_bytes() / GiB, 1),
            "python": platform.python_version(), "torch": torch.__version__, "build": build_info()["build"]}
    if build_info()["gpu_usable"] and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(figures: dict, ran_on: dict) -> None:
    width = max(len(k) for k in figures)
    print(f"{'figure':<{width}}  {'value':>12}  machine")
    for k, v in figures.items():
        val = f"{v:12.3f}" if isinstance(v, float) else f"{v!s:>12}"
        print(f"{k:<{width}}  {val}  {ran_on[k]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and CPU copies of int4 only (< 1 min)")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU figures even when a GPU is usable")
    args = ap.parse_args(argv)

    m = machine()
    cpu_name = f"{m['cpu']} ({m['cores']} cores, {m['ram_gib']} GiB)"
    figures: dict = {}
    ran_on: dict = {}
    t0 = time.time()

    def add(results: dict, where: str) -> None:
        figures.update(results)
        ran_on.update({k: where for k in results})

    # GPU figures first: on a GPU machine with little time they matter most.
    if not args.no_gpu and "gpu" in m:
        add(bench_gpu(args.quick), f"{m['gpu']} + {cpu_name}")
    elif not build_info()["gpu_usable"]:
        print(f"# no GPU figures: {build_info()['reason']}", file=sys.stderr)
    add(bench_index(args.quick), cpu_name)
    for dtype in (("int4",) if args.quick else ("int4", "bf16")):
        add(bench_cpu_copy(dtype, reps=5 if args.quick else 15), cpu_name)
    figures["cpu_restore_vs_memcpy"] = min(v for k, v in figures.items() if k.startswith("cpu_restore_vs_memcpy_"))
    ran_on["cpu_restore_vs_memcpy"] = cpu_name

    print_table(figures, ran_on)
    print(f"# {time.time() - t0:.1f} s, {'quick' if args.quick else 'full'} run", file=sys.stderr)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"figures": figures, "ran_on": ran_on, "machine": m, "quick": args.quick,
                       "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", "benchmark/micro.py"] + (argv or sys.argv[1:]))},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
