"""Cache regions from tensors: the (base pointer, per-block stride, bytes per block)
triples the core copies, read off tensors without the core ever linking torch."""
from __future__ import annotations

import itertools
from typing import Any, NamedTuple, Sequence


class Region(NamedTuple):
    base: int    # address of block 0
    stride: int  # bytes from one block to the next
    bytes: int   # bytes of one block in this region


def regions_from_tensor(tensor: Any, block_dim: int = 0) -> list[Region]:
    """One region per index of the dimensions before `block_dim`.

    LMDeploy's PyTorch engine keeps, per layer group, a uint8 pool shaped
    [layers, blocks, bytes]: block_dim=1 gives one region per layer. A pool
    indexed by block first ([blocks, ...]) is block_dim=0, one region.
    Within a block the bytes must be contiguous.
    """
    if block_dim < 0 or block_dim >= tensor.dim():
        raise ValueError(f"block_dim {block_dim} is outside a tensor of {tensor.dim()} dimensions {tuple(tensor.shape)}")
    size = tensor.element_size()
    out = []
    for idx in itertools.product(*(range(n) for n in tensor.shape[:block_dim])):
        per_block = tensor[idx] if idx else tensor
        if per_block.shape[0] == 0:
            raise ValueError(f"tensor of shape {tuple(tensor.shape)} has no blocks along dim {block_dim}")
        block0 = per_block[0]
        if not block0.is_contiguous():
            raise ValueError(
                f"a block of the tensor shaped {tuple(tensor.shape)} is not contiguous in memory "
                f"(strides {tuple(tensor.stride())}); register each contiguous piece as its own region")
        out.append(Region(per_block.data_ptr(), per_block.stride(0) * size, block0.numel() * size))
    return out


def regions_from_tensors(tensors: Sequence[Any], block_dim: int = 0) -> tuple[list[Region], int, str]:
    """Regions of several tensors that share the block count and device.

    Returns (regions, num_blocks, device string)."""
    if not tensors:
        raise ValueError("no tensors given: pass the KV cache tensors that hold the blocks")
    num_blocks = {int(t.shape[block_dim]) for t in tensors}
    if len(num_blocks) != 1:
        raise ValueError(f"tensors disagree on the number of blocks along dim {block_dim}: {sorted(num_blocks)}")
    devices = {str(t.device) for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"tensors live on different devices {sorted(devices)}; one HostCache serves one device")
    device = devices.pop()
    regions = [r for t in tensors for r in regions_from_tensor(t, block_dim)]
    return regions, num_blocks.pop(), device
