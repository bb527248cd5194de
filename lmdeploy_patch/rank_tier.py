"""The rank side of the host tier: each rank's SlotStore over LMDeploy's KV
pools, and when each copy of a forward's plan (copy_plan.py) runs.

Stream order on a GPU (two copy streams per rank, inside the SlotStore):

  forward stream:  ... forward N-1 ........... | wait(copies) | model N | ...
  restore stream:  restores for N (overlap N-1) |
  save stream:     after(N-1): post saves of N-1, pre saves | after(model N): post saves

- pre saves start after everything queued on the forward stream so far
  (forward N-1 may still write a block being evicted); restores too when one
  of their blocks belonged to the batches in flight, else they start at once
  and overlap forward N-1 (HostCopyPlan.restore_after_forward);
- a copy that shares a slot or block with an earlier copy on the other
  stream waits for it (the SlotStore orders them by events);
- model N waits for its restores, so it never reads a block before its
  restore lands, and for the saves, so it never overwrites a block an earlier
  save still reads (it skips the wait for earlier saves when no block was
  evicted since the last plan and it has no pre saves: HostCopyPlan.wait_saves);
- post saves start after model N wrote the blocks they copy.

Which rank store belongs to which model agent and cache engine is kept
here, weakly keyed by those LMDeploy objects.

What a rank measures for the restore decision (restore_decision.py): its
restore bandwidth once, when its store is built (calibrate_restore), and
the time of each prefill forward; and, for /metrics, each restore's latency
from its plan to its copy seen complete. The scheduler reads them from the
ranks in its own process (local_figures): the single-GPU executor's.
"""
from __future__ import annotations

import os
import time
import weakref
from typing import Any, Optional

import numpy as np

from lmdeploy_hostcache import HostCacheConfig, Region, SlotStore
from lmdeploy_hostcache.config import COPY_PATHS, PIN_MODES

from . import faults, slot_ledger, store_keys, store_link
from .copy_plan import HostCopyPlan
from .eligibility import tier_slots, turn_off
from .fallback_copy import FallbackCopier
from .histogram import LATENCY_BOUNDS_S, Histogram
from .log import log_once
from .settings import slot_stride
from .slot_ledger import SlotLedger


# Bytes the start-up calibration copies each way: enough that a copy's fixed
# cost does not dominate, little enough to take milliseconds.
CALIBRATION_BYTES = 64 << 20
CALIBRATION_RUNS = 3

def _split(items: list, finished: Any) -> tuple[list, list]:
    """(those finished, those still pending) of `items`, each in order: the
    copies and CUDA events a rank looks at lazily, never waiting on them."""
    done: list = []
    pending: list = []
    for item in items:
        (done if finished(item) else pending).append(item)
    return done, pending


def pool_regions(allocation: Any, blocks_per_logical: int) -> tuple[list[Region], int]:
    """One region per layer of every pool of a CacheAllocation.

    LMDeploy's pools are [layers, kernel blocks, bytes] with the block axis 1;
    a scheduler block is `blocks_per_logical` consecutive kernel blocks, so it
    is contiguous inside a layer and strided across layers."""
    regions: list[Region] = []
    num_blocks = None
    for pool in allocation.pools:
        t = pool.tensor
        if pool.entry_axis != 1 or t.dim() != 3:
            raise ValueError(f"unexpected KV pool layout: shape {tuple(t.shape)}, entry axis {pool.entry_axis}")
        size = t.element_size()
        if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError(f"KV pool rows are not contiguous: strides {tuple(t.stride())}")
        n = t.shape[1] // blocks_per_logical
        if num_blocks is not None and n != num_blocks:
            raise ValueError(f"KV pools disagree on the number of blocks: {num_blocks} and {n}")
        num_blocks = n
        block_bytes = blocks_per_logical * t.stride(1) * size
        for layer in range(t.shape[0]):
            regions.append(Region(t[layer].data_ptr(), block_bytes, block_bytes))
    if not regions:
        raise ValueError("the cache allocation has no pools")
    return regions, num_blocks


class WorkerTier:
    """Executes copy plans on one rank's SlotStore, in forward order."""

    def __init__(self, store: SlotStore, cuda: bool, config_id: int = 0, fallback: Optional[FallbackCopier] = None,
                 verify: bool = False):
        self.store = store
        self.cuda = cuda
        # The second copy path (fallback_copy.py); without it a copy the
        # engine refuses fails the forward, as before the ledger.
        self.fallback = fallback
        self.verify = verify
        self.ledger = SlotLedger(store.num_slots, verify, store.slot_checksum, self._redo_saves, cuda=cuda)
        self._checking: list[tuple[Any, np.ndarray, np.ndarray]] = []  # this forward's restores, checked before the model
        # id() of the cache config it was built from: the scheduler of the
        # same engine holds the same object (the single-GPU executor), so an
        # engine reads its own ranks' figures, not another engine's in this process.
        self.config_id = config_id
        # Copies not yet waited on by a forward, by direction. The CUDA store
        # runs each direction in order on its stream, so waiting on the newest
        # covers the rest; the CPU store orders only copies that share a slot
        # or a block, so a forward there waits on each.
        self._unwaited: dict[str, list] = {"offload": [], "restore": []}
        self.blocks_restored = 0
        self.blocks_saved = 0
        self._waited = 0.0       # seconds forwards spent waiting for copies (resolved)
        self._wait_events: list = []  # CUDA (start, end) events not yet resolved
        self._submits = 0
        self._pin_said: set[str] = set()
        self.restore_bytes_per_s: Optional[float] = None  # calibrate_restore
        self.restore_latency = Histogram(LATENCY_BOUNDS_S)
        self._restores_unseen: list[tuple[float, Any]] = []  # (plan time, transfer) not yet seen complete
        self._forwards: list[tuple[int, Any, Any]] = []      # (tokens, start, end) of prefill forwards, CUDA
        self._forward_start: Optional[tuple[int, Any]] = None
        self.prefill_samples: list[tuple[int, float]] = []  # (tokens, seconds) not yet read by the scheduler
        # With a store behind the pool: this rank's link to it (connect_store), and
        # restores recorded in the ledger (the store fills only quiet slots: slot_ledger.quiet).
        self.link: Optional[store_link.StoreLink] = None
        self.records_restores = False
        self.layout = ""  # what a slot holds, per pool (build_worker_tier): part of the store keys
        self.report_pinning()

    def report_pinning(self) -> None:
        """One line when pinning falls back (registration refused: pinned
        allocations; those refused too: unpinned, slower copies). Lazy pools pin
        while serving, so this is looked at again every few copies."""
        if not self.cuda or len(self._pin_said) == 2:
            return
        stats = self.store.stats()
        if stats.get("register_error") and "register" not in self._pin_said:
            self._pin_said.add("register")
            log_once(f"registering the host pool with CUDA was refused ({stats['register_error']}); "
                     "its chunks are pinned allocations instead, which copy as fast; serving goes on")
        if stats.get("pin_error") and "unpinned" not in self._pin_said:
            self._pin_said.add("unpinned")
            log_once(f"the host pool could not be pinned ({stats['pin_error']}); copies run from pageable "
                     "memory, slower, and the stats say pinned=False")

    def _copy(self, direction: str, slots: np.ndarray, blocks: np.ndarray, after: Any) -> Optional[Any]:
        """Queues a copy; one the engine refuses is made by the fallback path
        at once (None is returned then): a lost restore would feed the
        forward stale bytes, a lost save leave a matchable slot without them."""
        if direction == "offload" and self.ledger.lost:
            self.ledger.skipped(slots)  # the scheduler stops matching (slot_ledger.LOST)
            return None
        try:
            transfer = getattr(self.store, direction)(slots, blocks, after_stream=after)
            error = transfer.queue_error()
        except ValueError:
            raise  # a slot or block outside the pools: a planning bug, not a fault of the pool
        except RuntimeError as e:
            transfer, error = None, str(e)
        if not error:
            self._submit(transfer)
            if direction == "offload":
                self.ledger.submitted(transfer, slots, blocks)
            return transfer
        if self.fallback is None:
            raise RuntimeError(f"lmdeploy-hostcache: a host-cache {direction} could not be queued: {error}")
        self.ledger.counts["copy_failures"] += 1
        log_once(f"a host-cache {direction} could not be queued ({error}); copies the engine refuses are made by "
                 "the fallback path (counted in host_copy_failures)")
        if direction == "offload":
            self._redo_saves(slots, blocks, fatal=False)
        else:
            self._restore_by_fallback(slots, blocks)
        return None

    def _quiesce(self) -> None:
        """Every copy this rank queued has finished, and (CUDA) the forward
        stream too: the fallback path then reads and writes in their order."""
        for t in (*self._unwaited["offload"], *self._unwaited["restore"], *self.ledger.transfers()):
            t.wait()
        if self.cuda:
            import torch

            torch.cuda.current_stream().synchronize()

    def _redo_saves(self, slots: np.ndarray, blocks: np.ndarray, fatal: bool = True) -> None:
        """Saves by the fallback path (the ledger's repair, or a refused
        save), from blocks that still hold what the failed save was to copy
        (before_model says why). When this fails too the pool is unusable:
        the ledger is lost, the scheduler stops using it."""
        try:
            self._quiesce()
            self.fallback.save(slots, blocks)
        except Exception as e:
            if fatal:
                raise  # the ledger loses the pool
            self.ledger.lose(f"a save could not be queued, nor copied by the fallback path ({e})")
            self.ledger.skipped(slots)
            self._pool_lost()
            return
        if not fatal:
            self.ledger.copied(slots)
            self.ledger.counts["copies_redone"] += 1

    def _pool_lost(self) -> None:
        # The scheduler that reads the ledger says it, once (HostTier._pool_lost).
        if not self.ledger.watched:
            # No scheduler in this process reads the ledger: it would go on
            # planning restores of slots that were never filled.
            raise RuntimeError(f"lmdeploy-hostcache: the host pool is unusable ({self.ledger.lost}) and the "
                               "scheduler is in another process; restart without the host cache")

    def _restore_by_fallback(self, slots: np.ndarray, blocks: np.ndarray) -> None:
        try:
            self._quiesce()
            self.fallback.restore(slots, blocks)
        except Exception as e:
            # The forward would read blocks that hold nothing: it must not run.
            raise RuntimeError(f"lmdeploy-hostcache: a host-cache restore failed on both copy paths ({e}); the "
                               "host memory or the device is failing") from e
        self.ledger.counts["copies_redone"] += 1

    def _submit(self, transfer) -> None:
        self._submits += 1
        if self._submits % 32 == 1:
            self.report_pinning()
        pending = self._unwaited[transfer.direction]
        if self.cuda:
            pending[:] = [transfer]
        else:
            pending[:] = [t for t in pending if not t.done()] + [transfer]

    def before_model(self, plan: Optional[HostCopyPlan], stream: Any) -> None:
        """This forward's pre saves and restores, and what the model waits for.

        Why a save that failed after it was queued (CPU copies) can be redone
        from its block, and is redone before anything reads its slot: a save's
        block is written only by a later forward's model (after an eviction
        freed it: the model then waits for every save, and they are settled
        after that wait, below) or by a later plan's restore (saves sharing a
        slot or block with this plan's restores are waited for and settled
        before those restores are queued). Pre saves are waited for before
        this model. So each failed save is seen while its block still holds
        what it was to copy, and before a restore reads its slot. (A GPU
        orders its copies on the device: there such a failure is raised.)"""
        # Without a plan (warmup, a forward LMDeploy built itself) nothing is
        # known about block reuse: wait for everything, as before the tier.
        wait_saves = plan is None or plan.wait_saves
        self.ledger.settle()  # saves seen complete: checksummed, or redone from their blocks
        if plan is not None:
            if len(plan.pre_slots):
                self._copy("offload", plan.pre_slots, plan.pre_blocks, stream)
                self.blocks_saved += len(plan.pre_slots)
                wait_saves = True
            if len(plan.restore_slots):
                if not self.cuda:  # (the docstring) the store would order these restores behind them anyway
                    self.ledger.settle(wait_for=plan.restore_slots, wait_blocks=plan.restore_blocks)
                # The scheduler may have matched a slot before its save failed on
                # both paths (it plans the next forward while this one runs): no
                # forward may read what such a slot holds.
                unservable = self.ledger.unservable(plan.restore_slots)
                if unservable:
                    raise RuntimeError(f"lmdeploy-hostcache: a planned restore cannot be carried out: {unservable}; "
                                       "the host memory or the device is failing")
                # 0: no wait for the forwards already queued (see HostCopyPlan.restore_after_forward)
                after = stream if plan.restore_after_forward or stream is None else 0
                transfer = self._copy("restore", plan.restore_slots, plan.restore_blocks, after)
                if self.records_restores:
                    self.ledger.restoring(transfer, plan.restore_slots)
                if transfer is not None:
                    self._restores_unseen.append((plan.created, transfer))
                    self._checking.append((transfer, plan.restore_slots, plan.restore_blocks))
                elif self.verify:
                    self._checking.append((None, plan.restore_slots, plan.restore_blocks))
                self.blocks_restored += len(plan.restore_slots)
        # Restores are always waited for: the model reads what they write.
        waits = self._unwaited["restore"] + (self._unwaited["offload"] if wait_saves else [])
        if not waits:
            self._check_restores()
            self._see_restores()
            return
        if self.cuda:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for t in waits:
                t.wait_on_stream(stream)
            end.record(stream)
            self._wait_events.append((start, end))
            if len(self._wait_events) > 64:  # resolve finished ones even if nobody reads the figure
                self.wait_seconds()
        else:
            t0 = time.perf_counter()
            for t in waits:
                t.wait()
            self._waited += time.perf_counter() - t0
            if wait_saves:
                self.ledger.settle()  # a failed one is redone before the model may overwrite its block
        self._check_restores()
        self._see_restores()
        self._unwaited["restore"] = []
        if wait_saves:
            self._unwaited["offload"] = []

    def _check_restores(self) -> None:
        """This forward's restores, before the model reads them: one that
        failed is made again by the fallback path; with verification, each
        block's bytes are compared with its slot's checksum (taken when the
        save completed) and a block that differs is copied again. A GPU
        rank looks only with verification on (it waits for the copies then)."""
        checking, self._checking = self._checking, []
        for transfer, slots, blocks in checking:
            if transfer is not None and (not self.cuda or self.verify) and not transfer.wait():
                if self.fallback is None:
                    raise RuntimeError(f"lmdeploy-hostcache: a host-cache restore failed: {transfer.error}")
                self.ledger.counts["copy_failures"] += 1
                log_once(f"a host-cache restore failed after it was queued ({transfer.error}); failed copies are "
                         "made again by the fallback path (counted in host_copy_failures)")
                self._restore_by_fallback(slots, blocks)
            if self.verify:
                self._verify_restored(slots, blocks)

    def _verify_restored(self, slots: np.ndarray, blocks: np.ndarray) -> None:
        for slot, block in zip(slots.tolist(), blocks.tolist()):
            expected = self.ledger.expected(slot)
            if expected is None:  # the scheduler matched only checksummed slots (slot_ledger.check)
                raise RuntimeError(f"lmdeploy-hostcache: host slot {slot} was restored without a checksum to check "
                                   "it against")
            if self.store.block_checksum(block) == expected:
                continue
            if self.store.slot_checksum(slot) != expected:
                # Checked when matched, changed since: the host memory is failing; copying it again cannot help.
                raise RuntimeError(f"lmdeploy-hostcache: host slot {slot} changed after it was checked; the host "
                                   "memory is failing")
            self.ledger.counts["restore_mismatches"] += 1
            log_once(f"a restored block differed from the bytes saved in its host slot (slot {slot}, device block "
                     f"{block}); such blocks are copied again (counted in host_restore_mismatches)")
            self._restore_by_fallback(np.array([slot], dtype=np.uint32), np.array([block], dtype=np.int32))
            if self.store.block_checksum(block) != expected:
                raise RuntimeError(f"lmdeploy-hostcache: device block {block} still differs from host slot {slot} "
                                   "after copying it again; the device memory is failing")

    def _see_restores(self) -> None:
        """Restore latency, plan to copy complete, for each restore now seen
        complete. A CUDA copy is looked at on each forward boundary, so its
        latency is an upper bound by at most one forward; a CPU one is seen
        when the forward waits for it."""
        if not self._restores_unseen:
            return
        now = time.monotonic()
        done, self._restores_unseen = _split(self._restores_unseen, lambda r: r[1].done())
        for created, _ in done:
            if created > 0:
                self.restore_latency.observe(max(0.0, now - created))

    # ----- prefill timing (restore_decision.py learns the prefill rate from it)

    def forward_starts(self, tokens: int, prefill: bool, stream: Any) -> None:
        """The model is about to run `tokens` tokens; only prefills are timed."""
        if not prefill or tokens <= 0:
            self._forward_start = None
            return
        if self.cuda:
            import torch

            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            self._forward_start = (tokens, start)
        else:
            self._forward_start = (tokens, time.perf_counter())

    def forward_ends(self, stream: Any) -> None:
        started, self._forward_start = self._forward_start, None
        if started is None:
            return
        tokens, start = started
        if not self.cuda:
            self._sample(tokens, time.perf_counter() - start)
            return
        import torch

        end = torch.cuda.Event(enable_timing=True)
        end.record(stream)
        self._forwards.append((tokens, start, end))
        self._resolve_forwards()

    def _resolve_forwards(self) -> None:
        done, pending = _split(self._forwards, lambda f: f[2].query())
        for tokens, start, end in done:
            self._sample(tokens, start.elapsed_time(end) / 1e3)
        self._forwards = pending[-64:]  # a bound; nobody waits on these

    def _sample(self, tokens: int, seconds: float) -> None:
        self.prefill_samples.append((tokens, seconds))
        del self.prefill_samples[:-256]  # kept until the scheduler reads them; a bound if it never does

    def take_prefill_samples(self) -> list[tuple[int, float]]:
        if self.cuda:
            self._resolve_forwards()
        samples, self.prefill_samples = self.prefill_samples, []
        return samples

    # ----- start-up calibration

    def calibrate_restore(self, num_device_blocks: int, stream: Any = None) -> Optional[float]:
        """The restore bandwidth of this rank (bytes/s): copies a few blocks
        to host slots and back, timing the way back. Run once, when the store
        is built and before any forward: the blocks get their own bytes back,
        and the slots hold nothing the scheduler has indexed yet."""
        n = min(self.store.num_slots, num_device_blocks,
                max(1, CALIBRATION_BYTES // max(1, self.store.slot_bytes)))
        if n <= 0:
            return None
        # Blocks in reverse order against the slots: no slot's neighbour goes
        # to its block's neighbour, as in serving (the kernel copies per block).
        slots = np.arange(n, dtype=np.uint32)
        blocks = np.arange(n, dtype=np.int32)[::-1].copy()
        try:
            # After the stream: the pools may still be being zeroed on it.
            if not self.store.offload(slots, blocks, after_stream=stream).wait():
                return None
            best = float("inf")
            # The first restore loads the copy kernel and pins what is not
            # pinned yet: a warm-up, then the best of three (the copy's own
            # rate; a slow one would make auto recompute hits it should restore).
            for i in range(CALIBRATION_RUNS + 1):
                t0 = time.perf_counter()
                if not self.store.restore(slots, blocks, after_stream=0).wait():  # after the offload only
                    return None
                if i:
                    best = min(best, time.perf_counter() - t0)
        except Exception as e:  # a measurement, never a reason to stop the engine
            log_once(f"the host pool's restore bandwidth could not be measured ({e}); restores are not weighed "
                     "against recomputing")
            return None
        if not 0 < best < float("inf"):
            return None
        self.restore_bytes_per_s = n * self.store.slot_bytes / best
        return self.restore_bytes_per_s

    def wait_seconds(self) -> float:
        """Time forwards spent waiting for host copies: what the tier cost them."""
        done, self._wait_events = _split(self._wait_events, lambda e: e[1].query())
        self._waited += sum(start.elapsed_time(end) for start, end in done) / 1e3
        return self._waited

    def after_model(self, plan: Optional[HostCopyPlan], stream: Any) -> None:
        if plan is not None and len(plan.post_slots):
            self._copy("offload", plan.post_slots, plan.post_blocks, stream)
            self.blocks_saved += len(plan.post_slots)

    def close(self) -> None:
        """Waits for every copy this rank started (the pools are about to go);
        the store link stops, within a bound (store_link.StoreLink.close)."""
        for pending in self._unwaited.values():
            for t in pending:
                t.wait()
            pending.clear()
        slot_ledger.unregister(self.ledger)
        self.close_link()
        self.fallback = None  # its views of the GPU pools go now, not with the next cyclic collection

    def close_link(self) -> None:
        link, self.link = self.link, None
        if link is None:
            return
        store_link.unregister(link)
        if not link.close(STORE_CLOSE_S):
            # Its calls still use the host pool, which the link keeps; not the GPU pools it was built over.
            self.store._allocation = None
            log_once(f"the Mooncake Store did not answer within {STORE_CLOSE_S:g} s when its link was closed; "
                     "its client is left to finish on its own")


# How long dropping a rank's pool waits for its store client to finish.
STORE_CLOSE_S = 5.0


def connect_store(cache_config: Any, worker: WorkerTier, rank: int) -> None:
    """The rank's link to the Mooncake Store of host_cache_store, its host
    pool registered; a store that cannot be reached leaves the host tier
    alone, said in one line."""
    path = getattr(cache_config, "host_cache_store", None)
    namespace = getattr(cache_config, "host_cache_store_namespace", None)
    if not path or namespace is None:
        return
    worker.records_restores = True
    if getattr(cache_config, "host_cache_store_off", None):
        return  # stopped for this engine (its weights changed): not again at a wakeup
    from lmdeploy_hostcache.mooncake_store import FULL, MISSING, MooncakeStore, StoreConfig

    client = None
    try:
        config = StoreConfig.from_file(path)  # read again: the file may have changed since the config was built
        client = MooncakeStore(config)
        client.register(worker.store.memory_ranges())
    except Exception as e:  # noqa: BLE001 - unreachable, refused, not installed: the host tier serves alone
        if client is not None:
            client.close()
        log_once(f"the Mooncake Store of host_cache_store ({path}) cannot be used ({e}); serving with the host "
                 "tier alone")
        return
    prefix = store_keys.key_prefix(namespace, rank, worker.layout)
    worker.link = store_link.StoreLink(client, prefix, worker.store.slot_address, worker.store.slot_bytes,
                                       keep_alive=worker.store, missing=MISSING, full=FULL)
    store_link.register(worker.config_id, worker.link)
    log_once(f"host cache store on: Mooncake master {config.master_server_address} ({config.protocol}), keys under "
             f"{prefix}")


def weights_changed(agent: Any) -> None:
    """The agent's weights are about to change in place: its engine stops
    using the store for the rest of the run (said once); the host tier goes on."""
    cc = agent.cache_config
    if not getattr(cc, "host_cache_store", None):
        return
    cc.host_cache_store_off = "its weights were updated"  # read by the scheduler side and at a wakeup
    worker = _BY_AGENT.get(agent)
    if worker is not None:
        worker.close_link()
    log_once("the weights of this engine are updated in place: it stops using the Mooncake Store "
             "(host_cache_store), whose keys name the model by its name and config, not its weights; "
             "the host tier goes on")


def build_worker_tier(cache_config: Any, allocation: Any, blocks_per_logical: int, copy_path: str = "kernel",
                      device: Optional[str] = None, pin: str = "lazy") -> WorkerTier:
    """A rank's store: host_cache_slots slots of this rank's block size,
    with its fallback copy path, its ledger (registered for the scheduler in
    this process) and the test-only faults of HOSTCACHE_FAULTS."""
    faults.before_build()
    regions, num_blocks = pool_regions(allocation, blocks_per_logical)
    slot_bytes = sum(r.bytes for r in regions)
    stride = slot_stride(slot_bytes)
    if device is None:
        device = str(allocation.pools[0].tensor.device)
        if device == "cuda":
            device = "cuda:0"
    slots = int(cache_config.host_cache_slots)
    config = HostCacheConfig(capacity_bytes=slots * stride, device=device,
                             copy_path=copy_path, pin=pin, reserve_bytes=0,  # the executor checked RAM for all ranks
                             capacity_setting="host_cache_ratio / host_cache_size")
    store = SlotStore(config, regions, num_blocks)
    if store.num_slots != slots:
        raise RuntimeError(f"host pool has {store.num_slots} slots, the scheduler expects {slots}")
    store._allocation = allocation  # the pools must outlive the store
    fallback = FallbackCopier(allocation, blocks_per_logical, store)
    worker = WorkerTier(store, cuda=device.startswith("cuda"), config_id=id(cache_config), fallback=fallback,
                        verify=bool(getattr(cache_config, "host_cache_verify", False)))
    worker.layout = store_keys.slot_layout(allocation, blocks_per_logical)
    stream = None
    if worker.cuda:
        import torch

        stream = torch.cuda.current_stream()
    worker.calibrate_restore(num_blocks, stream)
    faults.inject(worker, fallback.scribble)  # test-only; after calibration: its copies are no serving copies
    slot_ledger.register(worker.config_id, worker.ledger)
    return worker


def _choice(variable: str, default: str, accepted: tuple[str, ...]) -> str:
    value = os.environ.get(variable, "").strip() or default
    if value not in accepted:
        raise ValueError(f"{variable}={value!r}: use one of {', '.join(accepted)} (unset: {default})")
    return value


def copy_path() -> str:
    """HOSTCACHE_COPY_PATH=memcpy selects the batched-memcpy path."""
    return _choice("HOSTCACHE_COPY_PATH", "kernel", COPY_PATHS)


def pin_mode() -> str:
    """HOSTCACHE_PIN=eager registers the whole pool at start-up (seconds per
    tens of GiB) instead of a 256 MiB chunk at a time while serving (lazy)."""
    return _choice("HOSTCACHE_PIN", "lazy", PIN_MODES)


# ----- which rank store serves which cache engine (and which model agent built it)

# The agent holds its store (closed explicitly when its pools go: sleep,
# close, rebuild); the forward path finds it by the cache engine it is given.
_BY_AGENT: "weakref.WeakKeyDictionary[Any, WorkerTier]" = weakref.WeakKeyDictionary()
_BY_CACHE_ENGINE: "weakref.WeakKeyDictionary[Any, WorkerTier]" = weakref.WeakKeyDictionary()
# Agents whose pool could not be built (again): their ledger says so to the scheduler.
_LOST_BY_AGENT: "weakref.WeakKeyDictionary[Any, SlotLedger]" = weakref.WeakKeyDictionary()


def register(cache_engine: Any, worker: WorkerTier, agent: Any = None) -> None:
    """`worker` executes the plans of forwards on `cache_engine` (of `agent`)."""
    _BY_CACHE_ENGINE[cache_engine] = worker
    if agent is not None:
        _BY_AGENT[agent] = worker


def worker_for(cache_engine: Any) -> Optional[WorkerTier]:
    try:
        return _BY_CACHE_ENGINE.get(cache_engine)
    except TypeError:  # None, or an object that cannot be weakly referenced
        return None


def unregister(cache_engine: Any) -> bool:
    """Waits for the copies of the store serving `cache_engine` and forgets it
    (its pools are about to go); True if there was one."""
    worker = _BY_CACHE_ENGINE.pop(cache_engine, None) if cache_engine is not None else None
    if worker is None:
        return False
    _forget(worker)
    return True


# Failure counts of ranks whose stores were dropped (sleep), by config id: counters never go down.
_RETIRED: dict[int, dict[str, int]] = {}


def _forget(worker: WorkerTier) -> None:
    for table in (_BY_AGENT, _BY_CACHE_ENGINE):
        for key, w in list(table.items()):
            if w is worker:
                del table[key]
    retired = _RETIRED.setdefault(worker.config_id, {})
    for name, n in worker.ledger.counts.items():
        retired[name] = retired.get(name, 0) + n
    worker.close()


def local_workers(config_id: Optional[int] = None) -> list[WorkerTier]:
    """The ranks in this process; with config_id, those of that engine's cache config."""
    workers = {id(w): w for w in (*_BY_AGENT.values(), *_BY_CACHE_ENGINE.values())}.values()
    return [w for w in workers if config_id is None or w.config_id == config_id]


def local_figures(config_id: int) -> dict:
    """What this engine's ranks in this process (the single-GPU executor)
    measured: how long forwards waited for copies, restore latencies; other
    processes' ranks cannot be reached here."""
    workers = local_workers(config_id)
    if not workers:
        return {}
    latency = workers[0].restore_latency
    for w in workers[1:]:
        latency = latency.merge(w.restore_latency)
    counts = dict(_RETIRED.get(config_id, {}))
    for w in workers:
        for name, n in w.ledger.counts.items():
            counts[name] = counts.get(name, 0) + n
    return {"host_restore_wait_seconds": sum(w.wait_seconds() for w in workers),
            "host_restore_latency": latency.snapshot(), **{f"host_{k}": v for k, v in counts.items()}}


def local_restore_bandwidth(config_id: int) -> Optional[float]:
    """The slowest of this engine's local ranks' calibrated restore bandwidth (bytes/s), or None."""
    rates = [w.restore_bytes_per_s for w in local_workers(config_id) if w.restore_bytes_per_s]
    return min(rates) if rates else None


def take_local_prefill_samples(config_id: int) -> list[tuple[int, float]]:
    """Prefill forwards this engine's local ranks timed since the last call
    (one rank's: ranks of one forward time the same tokens)."""
    workers = local_workers(config_id)
    samples = workers[0].take_prefill_samples() if workers else []
    for w in workers[1:]:
        w.take_prefill_samples()
    return samples


def attach_to_agent(agent: Any) -> None:
    """On each rank, after its KV pools exist: the SlotStore over them.
    A rank that cannot build it stops the engine: the scheduler would plan
    restores that nobody executes."""
    cc = agent.cache_config
    if tier_slots(cc) <= 0:
        return
    try:
        worker = build_worker_tier(cc, agent.cache_engine.gpu_allocation,
                                   agent.block_cache_plan.kernel_blocks_per_logical_block, copy_path(),
                                   pin=pin_mode())
    except ValueError:
        raise  # a setting to change (HOSTCACHE_PIN, HOSTCACHE_COPY_PATH): said as it is
    except Exception as e:
        reason = f"the host pool could not be set up on rank {agent.rank}: {e}"
        if getattr(cc, "host_cache_pid", None) != os.getpid():
            # The scheduler is in another process: it would plan copies nobody makes.
            raise RuntimeError(f"lmdeploy-hostcache: {reason}. Lower host_cache_ratio/host_cache_size or start "
                               "without the host cache.") from e
        # The scheduler reads this very config (before it is built) and this
        # ledger (after a sleep, when it is built already): serving goes on without the tier.
        turn_off(cc, reason)
        lost = SlotLedger.unusable(reason)
        slot_ledger.register(id(cc), lost)
        _LOST_BY_AGENT[agent] = lost
        return
    connect_store(cc, worker, int(getattr(agent, "rank", 0) or 0))
    register(agent.cache_engine, worker, agent)


def drop_from_agent(agent: Any) -> bool:
    """The agent's pools are about to go (sleep, close, rebuild): its store
    waits for its copies and is forgotten; True if it had one."""
    lost = _LOST_BY_AGENT.pop(agent, None)
    if lost is not None:
        slot_ledger.unregister(lost)
    worker = _BY_AGENT.get(agent)
    if worker is None:
        return False
    _forget(worker)
    return True
