"""lmdeploy-hostcache: a host-memory tier for LMDeploy's KV cache."""
from __future__ import annotations

from . import _core
from ._core import available_ram_bytes, ram_budget, slot_stride, total_ram_bytes
from .config import GiB, MiB, HostCacheConfig
from .binding import as_tokens
from .host_cache import ROOT_KEY, HostCache, Match, OffloadResult, Transfer
from .regions import Region, regions_from_tensor, regions_from_tensors
from .slot_store import SlotStore, StoreTransfer
from .mooncake_store import MooncakeStore, StoreConfig

__version__ = "0.1.0"


def build_info() -> dict:
    """Which build this is and whether a GPU is usable, e.g.
    {'cuda_compiled': True, 'gpu_usable': False, 'reason': '...'}."""
    info = dict(_core.device_info())
    info["build"] = "cuda" if info["cuda_compiled"] else "cpu"
    info["version"] = __version__
    return info


__all__ = [
    "GiB", "MiB", "HostCacheConfig", "SlotStore", "StoreTransfer", "HostCache", "Match", "OffloadResult", "Transfer", "Region", "ROOT_KEY",
    "regions_from_tensor", "regions_from_tensors", "as_tokens", "build_info", "available_ram_bytes", "ram_budget",
    "total_ram_bytes", "slot_stride", "MooncakeStore", "StoreConfig",
]
