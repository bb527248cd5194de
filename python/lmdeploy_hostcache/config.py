"""HostCacheConfig: what a host tier is built from, checked before anything is allocated."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

GiB = 1 << 30
MiB = 1 << 20
# RAM a host pool leaves to the rest of the machine unless told otherwise
# (LMDeploy's integration sizes pools against the same figure).
DEFAULT_RESERVE_BYTES = 2 * GiB

PIN_MODES = ("lazy", "eager", "off")
COPY_PATHS = ("kernel", "memcpy")


def _check_int(name: str, value: object, low: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}; {hint}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}; {hint}")


@dataclass(frozen=True)
class HostCacheConfig:
    """Settings of one host tier (one rank).

    capacity_bytes: host pool size; slots of one block each are cut from it.
    block_tokens: tokens per KV block (LMDeploy's block_size, 64 by default);
        HostCache only (a SlotStore addresses slots, not tokens).
    device: where the registered regions live: 'cpu', 'cuda' or 'cuda:N';
        None takes it from the tensors given to HostCache.from_tensors.
    pin: 'lazy' pins chunks of the pool as slots come into use, 'eager' pins
        all at start, 'off' never pins (CUDA copies then go through pageable
        memory, slower). Pinning applies to CUDA regions only.
    copy_path: CUDA only: 'kernel' (one gather/scatter kernel per transfer)
        or 'memcpy' (batched cudaMemcpyAsync).
    cpu_workers: threads copying CPU regions (0 copies synchronously).
    checksum: verify every restored block against a checksum taken at
        offload; HostCache only (a SlotStore refuses it).
    reserve_bytes: RAM the pool must leave to the rest of the machine.
    capacity_setting: the user-facing name of the size setting, for errors.
    """

    capacity_bytes: int
    block_tokens: int = 64
    device: Optional[str] = None
    pin: str = "lazy"
    copy_path: str = "kernel"
    cpu_workers: int = 2
    checksum: bool = False
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    pin_chunk_bytes: int = 256 * MiB
    capacity_setting: str = "capacity_bytes"

    def __post_init__(self) -> None:
        _check_int("capacity_bytes", self.capacity_bytes, 1, "give the host pool size in bytes")
        _check_int("block_tokens", self.block_tokens, 1, "use the engine's tokens per KV block (64 in LMDeploy)")
        _check_int("cpu_workers", self.cpu_workers, 0, "use 0 for synchronous copies")
        _check_int("reserve_bytes", self.reserve_bytes, 0, "RAM to leave free for the rest of the machine")
        _check_int("pin_chunk_bytes", self.pin_chunk_bytes, 1, "size of each pinned registration")
        if self.pin not in PIN_MODES:
            raise ValueError(f"pin must be one of {PIN_MODES}, got {self.pin!r}")
        if self.copy_path not in COPY_PATHS:
            raise ValueError(f"copy_path must be one of {COPY_PATHS}, got {self.copy_path!r}")
        if not isinstance(self.checksum, bool):
            raise TypeError(f"checksum must be a bool, got {self.checksum!r}")
        if self.device is not None:
            parse_device(self.device)

    @classmethod
    def from_gib(cls, gib: float, **kwargs) -> "HostCacheConfig":
        if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not math.isfinite(gib) or gib <= 0:
            raise ValueError(f"host pool size must be a positive finite number of GiB, got {gib!r}")
        return cls(capacity_bytes=int(gib * GiB), **kwargs)

    def replace(self, **changes) -> "HostCacheConfig":
        return dataclasses.replace(self, **changes)


def parse_device(device: str) -> tuple[bool, int]:
    """'cpu' -> (False, 0); 'cuda' -> (True, 0); 'cuda:N' -> (True, N)."""
    text = str(device)
    if text == "cpu":
        return False, 0
    if text == "cuda":
        return True, 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return True, int(text[5:])
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
