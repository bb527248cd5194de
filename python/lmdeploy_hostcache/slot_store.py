"""SlotStore: host slots and their copy engine, addressed by slot id.

For engines whose scheduler keeps the prefix index in another place (or
process) than the KV pools: the scheduler decides which slot holds which
block and ships copy plans; each rank executes them on its own SlotStore.
Copies take effect in submission order per slot and per device block (on
the CUDA engine restores and saves run on two streams, ordered by events
where they share one), so a restore queued after the offload of the same
slot reads the finished bytes.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np

from . import _core
from .binding import after_stream_handle, config_for_tensors, core_options, stream_handle
from .config import HostCacheConfig
from .regions import Region


class StoreTransfer:
    """One batched copy of a SlotStore."""

    def __init__(self, handle: Any, direction: str, num_blocks: int):
        self._handle = handle
        self.direction = direction
        self.num_blocks = num_blocks

    def done(self) -> bool:
        return self._handle.done()

    def wait(self) -> bool:
        """Blocks until finished; returns whether every byte arrived."""
        self._handle.wait()
        return not self._handle.error()

    @property
    def error(self) -> str:
        return self._handle.error() if self._handle.done() else ""

    def queue_error(self) -> str:
        """Why the engine could not queue this copy, right after submission
        ('' when it was queued); no need to wait for it."""
        return self._handle.error()

    def wait_on_stream(self, stream: Any) -> None:
        """Makes work queued later on `stream` wait for this copy (CUDA)."""
        self._handle.make_stream_wait(stream_handle(stream))


class SlotStore:
    def __init__(self, config: HostCacheConfig, regions: Sequence[Union[Region, tuple]], num_device_blocks: int):
        if config.checksum:
            # A setting the store would otherwise silently ignore: checksums
            # are taken and checked where the index is (HostCache).
            raise ValueError("checksum=True needs the index: use HostCache, or compare SlotStore.slot_view(slot) "
                             "with the device block yourself; a SlotStore only copies")
        opts, triples, cuda, device = core_options(config, regions, num_device_blocks, _core.StoreOptions())
        self.config = config
        self.num_device_blocks = num_device_blocks
        self._core = _core.SlotStore(opts, triples, num_device_blocks)
        self._cuda_device = device if cuda else None

    @classmethod
    def from_tensors(cls, config: HostCacheConfig, tensors: Sequence[Any], block_dim: int = 0) -> "SlotStore":
        config, regions, num_blocks = config_for_tensors(config, tensors, block_dim)
        store = cls(config, regions, num_blocks)
        store._tensors = list(tensors)  # the memory must outlive the store
        return store

    @property
    def num_slots(self) -> int:
        return self._core.num_slots

    @property
    def slot_bytes(self) -> int:
        return self._core.slot_bytes

    def offload(self, slots: Any, device_blocks: Any, after_stream: Any = None) -> StoreTransfer:
        """Copies device_blocks[i] into slots[i]."""
        return self._submit("offload", slots, device_blocks, after_stream)

    def restore(self, slots: Any, device_blocks: Any, after_stream: Any = None) -> StoreTransfer:
        """Copies slots[i] into device_blocks[i]."""
        return self._submit("restore", slots, device_blocks, after_stream)

    def _submit(self, direction: str, slots: Any, device_blocks: Any, after_stream: Any) -> StoreTransfer:
        s = np.ascontiguousarray(slots, dtype=np.uint32).reshape(-1)
        b = np.ascontiguousarray(device_blocks, dtype=np.int32).reshape(-1)
        handle = self._core.submit(direction, s, b, after_stream_handle(after_stream, self._cuda_device))
        return StoreTransfer(handle, direction, len(s))

    def slot_view(self, slot: int) -> np.ndarray:
        return np.frombuffer(self._core.slot_view(int(slot)), dtype=np.uint8)

    def memory_ranges(self) -> list[tuple[int, int]]:
        """(address, bytes) of each chunk of the pool, every chunk prepared
        first so that none moves later: what a store registers to read and
        write slots in place (slot_address gives a slot's address)."""
        return [(int(p), int(n)) for p, n in self._core.memory_ranges()]

    def slot_address(self, slot: int) -> int:
        """Where a slot's bytes start (stable once memory_ranges was called)."""
        view = np.frombuffer(self._core.slot_view(int(slot)), dtype=np.uint8)
        return int(view.ctypes.data)

    def slot_checksum(self, slot: int) -> int:
        """XXH64 of the slot's bytes (the core's hash, as HostCache's checksum mode)."""
        return self._core.slot_checksum(int(slot))

    def block_checksum(self, block: int) -> int:
        """XXH64 of a device block's bytes, read back synchronously and hashed like a slot."""
        return self._core.block_checksum(int(block))

    def stats(self) -> dict:
        return self._core.stats()
