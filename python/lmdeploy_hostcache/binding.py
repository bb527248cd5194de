"""Turning Python arguments (configs, tensors, token lists, streams) into
what the core takes: integers, pointers and int32 arrays."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from . import _core
from .config import HostCacheConfig, parse_device
from .regions import Region, regions_from_tensors

_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1


def as_tokens(tokens: Any) -> np.ndarray:
    """Token ids as a contiguous int32 array. Wider ids are range-checked:
    wrapping them silently would make different prompts look equal."""
    if hasattr(tokens, "detach"):  # torch tensor
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.dtype == np.int32:
        return np.ascontiguousarray(arr)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < _INT32_MIN or arr.max() > _INT32_MAX):
        raise ValueError("token ids must fit in int32")
    return np.ascontiguousarray(arr, dtype=np.int32)


# cudaStreamLegacy: torch reports its default stream as handle 0, which the
# core reads as "no stream"; the legacy default stream's own handle is 1.
CUDA_STREAM_LEGACY = 1


def stream_handle(stream: Any) -> int:
    """A raw cudaStream_t from an int (0 = none) or a torch.cuda.Stream."""
    if stream is None:
        return 0
    if isinstance(stream, int):
        return stream
    handle = getattr(stream, "cuda_stream", None)
    if handle is None:
        raise TypeError(f"expected a torch.cuda.Stream or a raw stream handle, got {type(stream).__name__}")
    return int(handle) or CUDA_STREAM_LEGACY


def core_options(config: HostCacheConfig, regions: Sequence[Union[Region, tuple]], num_device_blocks: int,
                 opts: Any) -> tuple[Any, list[tuple[int, int, int]], bool, int]:
    """Fills core options from a config and checks the region triples."""
    if not isinstance(config, HostCacheConfig):
        raise TypeError(f"config must be a HostCacheConfig, got {type(config).__name__}")
    if isinstance(num_device_blocks, bool) or not isinstance(num_device_blocks, int) or num_device_blocks <= 0:
        raise ValueError(f"num_device_blocks must be a positive int, got {num_device_blocks!r}")
    cuda, device = parse_device(config.device or "cpu")
    opts.capacity_bytes = config.capacity_bytes
    opts.reserve_bytes = config.reserve_bytes
    opts.cuda = cuda
    opts.device = device
    opts.pin_mode = getattr(_core.PinMode, config.pin)
    opts.copy_path = getattr(_core.CopyPath, config.copy_path)
    opts.cpu_workers = config.cpu_workers
    opts.pin_chunk_bytes = config.pin_chunk_bytes
    opts.capacity_setting = config.capacity_setting
    triples = [tuple(int(v) for v in r) for r in regions]
    for i, r in enumerate(triples):
        if len(r) != 3:
            raise ValueError(f"region {i} must be (base, stride, bytes), got {r!r}")
        if min(r) < 0:
            raise ValueError(f"region {i} has a negative field: {r!r}")
    return opts, triples, cuda, device


def after_stream_handle(stream: Any, cuda_device: Optional[int]) -> int:
    """The stream a copy must follow. By default, for CUDA regions, the
    caller's current torch stream: a copy then never races the kernels the
    caller queued before it. Pass 0 to order after nothing."""
    if stream is None and cuda_device is not None:
        import torch  # only CUDA regions get here, and they came from torch or a CUDA caller

        return stream_handle(torch.cuda.current_stream(cuda_device))
    return stream_handle(stream)



def config_for_tensors(config: HostCacheConfig, tensors: Sequence[Any],
                       block_dim: int) -> tuple[HostCacheConfig, list[Region], int]:
    """Regions of `tensors` and the config with the tensors' device."""
    regions, num_blocks, device = regions_from_tensors(tensors, block_dim)
    if config.device is not None and parse_device(config.device) != parse_device(device):
        raise ValueError(f"config.device is {config.device!r} but the tensors live on {device!r}")
    return config.replace(device=device), regions, num_blocks
