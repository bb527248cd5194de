"""HostCache: the Python face of the host tier (pool, prefix index, copy engine)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np

from . import _core
from .binding import after_stream_handle, as_tokens, config_for_tensors, core_options, stream_handle
from .config import HostCacheConfig
from .regions import Region

ROOT_KEY: int = _core.ROOT_KEY


class Transfer:
    """One batched asynchronous copy. Its slots stay pinned until it is done."""

    def __init__(self, cache: "HostCache", record: Any):
        self._cache = cache
        self._record = record

    @property
    def direction(self) -> str:
        return self._record.direction

    @property
    def num_blocks(self) -> int:
        return self._record.num_blocks

    def done(self) -> bool:
        """Non-blocking: True once the copy finished and the tier settled it."""
        return self._record.finished or self._cache._core.poll(self._record)

    def wait(self) -> bool:
        """Blocks until finished; returns ok. On False the caller recomputes."""
        self._cache._core.wait(self._record)
        return self._record.ok

    def wait_on_stream(self, stream: Any) -> None:
        """Makes work queued later on `stream` wait for this copy (CUDA)."""
        self._cache._core.make_stream_wait(self._record, stream_handle(stream))

    @property
    def ok(self) -> bool:
        if not self._record.finished:
            raise RuntimeError("transfer still running: call done() or wait() first")
        return self._record.ok

    @property
    def error(self) -> str:
        return self._record.error

    @property
    def seconds(self) -> float:
        return self._record.seconds

    def __repr__(self) -> str:
        state = ("ok" if self._record.ok else f"failed: {self._record.error}") if self._record.finished else "running"
        return f"Transfer({self.direction}, {self.num_blocks} blocks, {state})"


@dataclass
class Match:
    """Blocks found in host memory, in prefix order. With pin=True the slots
    are held until release() or until a restore takes the pins over."""

    keys: np.ndarray
    slots: np.ndarray
    block_tokens: int
    pinned: bool
    _cache: Optional["HostCache"] = field(default=None, repr=False)
    _held: bool = field(default=False, repr=False)

    @property
    def num_blocks(self) -> int:
        return len(self.slots)

    @property
    def num_tokens(self) -> int:
        return len(self.slots) * self.block_tokens

    def last_key(self, parent: int = ROOT_KEY) -> int:
        """Parent key for whatever follows the matched blocks."""
        return int(self.keys[-1]) if len(self.keys) else parent

    def release(self) -> None:
        """Drops the pins of a pinned match that will not be restored."""
        if self._held and self._cache is not None:
            self._held = False
            self._cache._core.release(self.slots)


@dataclass
class OffloadResult:
    transfer: Transfer
    keys: np.ndarray       # one per block given
    slots: np.ndarray      # -1 where the block was not stored
    created: int           # blocks copied by this transfer
    existing: int          # blocks already in host memory (or on their way)
    dropped: int           # blocks not stored: pool full of pinned or inner blocks


class HostCache:
    """A host-memory KV tier over registered device regions.

    Build with HostCache.from_tensors(config, kv_tensors, block_dim) or with
    explicit Region triples. All methods are thread-safe.
    """

    def __init__(self, config: HostCacheConfig, regions: Sequence[Union[Region, tuple]], num_device_blocks: int):
        opts, triples, cuda, device = core_options(config, regions, num_device_blocks, _core.Options())
        opts.block_tokens = config.block_tokens
        opts.checksum = config.checksum
        self.config = config
        self.regions = [Region(*r) for r in triples]
        self.num_device_blocks = num_device_blocks
        self._core = _core.HostCache(opts, triples, num_device_blocks)
        self._cuda_device = device if cuda else None

    def _after(self, stream: Any) -> int:
        return after_stream_handle(stream, self._cuda_device)

    @classmethod
    def from_tensors(cls, config: HostCacheConfig, tensors: Sequence[Any], block_dim: int = 0) -> "HostCache":
        """Registers every block of `tensors` (indexed by block along block_dim);
        the device comes from the tensors. The tensors must outlive the cache."""
        config, regions, num_blocks = config_for_tensors(config, tensors, block_dim)
        cache = cls(config, regions, num_blocks)
        cache._tensors = list(tensors)  # keep the memory alive as long as the cache
        return cache

    @property
    def block_tokens(self) -> int:
        return self._core.block_tokens

    @property
    def slot_bytes(self) -> int:
        return self._core.slot_bytes

    @property
    def num_slots(self) -> int:
        return self._core.num_slots

    def block_keys(self, tokens: Any, parent: int = ROOT_KEY, namespace: int = 0) -> np.ndarray:
        """Chained keys of the full blocks of `tokens`."""
        return self._core.block_keys(parent, namespace, as_tokens(tokens))

    def match(self, tokens: Any, parent: int = ROOT_KEY, namespace: int = 0, pin: bool = False) -> Match:
        """Longest run of full blocks of `tokens` held in host memory,
        continuing from `parent` (the key of the block before tokens[0])."""
        keys, slots = self._core.match(parent, namespace, as_tokens(tokens), pin)
        return Match(keys, slots, self.block_tokens, pin, self, pin and len(slots) > 0)

    def offload(self, tokens: Any, device_blocks: Any, parent: int = ROOT_KEY, namespace: int = 0,
                after_stream: Any = None) -> OffloadResult:
        """Saves block i of `tokens` from device block device_blocks[i], for
        each i < len(device_blocks); blocks already stored are not copied.
        The copy starts after the work queued on `after_stream` (default:
        the current CUDA stream for CUDA regions)."""
        blocks = np.ascontiguousarray(device_blocks, dtype=np.int32).reshape(-1)
        toks = as_tokens(tokens)
        n, bt = len(blocks), self.block_tokens
        if len(toks) < n * bt:
            raise ValueError(f"{n} device blocks need {n * bt} tokens ({bt} per block), got {len(toks)}")
        keys = self._core.block_keys(parent, namespace, toks[: n * bt])
        parents = np.empty(n, dtype=np.uint64)
        parents[:1] = parent
        parents[1:] = keys[:-1]
        namespaces = np.full(n, namespace, dtype=np.uint64)
        return self.offload_blocks(parents, namespaces, toks[: n * bt].reshape(n, bt), blocks, after_stream)

    def offload_blocks(self, parents: Any, namespaces: Any, tokens: Any, device_blocks: Any,
                       after_stream: Any = None) -> OffloadResult:
        """Batch form of offload over blocks of many sequences: row i of
        `tokens` is one block under parents[i] in namespaces[i]."""
        record, keys, slots, created, existing, dropped = self._core.offload(
            np.asarray(parents, dtype=np.uint64), np.asarray(namespaces, dtype=np.uint64), as_tokens(tokens),
            np.asarray(device_blocks, dtype=np.int32), self._after(after_stream))
        return OffloadResult(Transfer(self, record), keys, slots, created, existing, dropped)

    def restore(self, match: Union[Match, Any], device_blocks: Any, after_stream: Any = None) -> Transfer:
        """Copies matched slots into device blocks (one block per slot). A
        pinned Match hands its pins to the transfer, which drops them when done."""
        if isinstance(match, Match):
            slots, take_pins = match.slots, match._held
            match._held = False
        else:
            slots, take_pins = np.asarray(match, dtype=np.uint32), False
        record = self._core.restore(slots, np.asarray(device_blocks, dtype=np.int32), self._after(after_stream),
                                    take_pins)
        return Transfer(self, record)

    def slot_view(self, slot: int) -> np.ndarray:
        """The bytes a host slot holds, as a writable uint8 array (tests, debugging)."""
        return np.frombuffer(self._core.slot_view(int(slot)), dtype=np.uint8)

    def wait_all(self) -> None:
        self._core.wait_all()

    def stats(self) -> dict:
        s = self._core.stats()
        s["hit_rate"] = s["hit_blocks"] / s["query_blocks"] if s["query_blocks"] else 0.0
        return s

    def check_invariants(self) -> None:
        """Raises if the index or the pins are inconsistent (for tests)."""
        self._core.check_invariants()

    def inject_failures(self, n: int) -> None:
        """Test hook: the next n transfers report failure after copying."""
        self._core.inject_failures(n)
