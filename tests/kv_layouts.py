"""CPU stand-ins for LMDeploy's KV pools, byte for byte the same shapes.

LMDeploy 0.18's PyTorch engine (PackedBlockCacheLayout) keeps per layer group
one uint8 pool [layers, blocks, pool_bytes]; inside a layer a block holds K,
V and, for quantized caches, K/V scale-zero rows, each piece 256-byte
aligned. `separate` mimics engines that keep K, V and scale/zero as their own
tensors ([blocks, block_size, heads, dim] each), registering many regions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmdeploy_hostcache import regions_from_tensor

ALIGN = 256


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class KVShape:
    layers: int = 4
    heads: int = 2
    head_dim: int = 64
    block_size: int = 64
    dtype: str = "bf16"  # bf16 | int8 | int4

    def pieces(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, per-block shape, dtype) of each tensor of one layer's block."""
        t, h, d = self.block_size, self.heads, self.head_dim
        if self.dtype == "bf16":
            return [("k", (t, h, d), torch.bfloat16), ("v", (t, h, d), torch.bfloat16)]
        packed = d if self.dtype == "int8" else d // 2  # int4: two values per byte
        return [("k", (t, h, packed), torch.uint8), ("v", (t, h, packed), torch.uint8),
                ("k_scale_zero", (t, h, 2), torch.float16), ("v_scale_zero", (t, h, 2), torch.float16)]

    def layer_block_bytes(self) -> int:
        return sum(_align(int(np.prod(s)) * torch.empty(0, dtype=dt).element_size()) for _, s, dt in self.pieces())


class KVPool:
    """A device-pool stand-in: tensors plus how they register as regions."""

    def __init__(self, shape: KVShape, num_blocks: int, layout: str = "packed", seed: int = 0):
        self.shape, self.num_blocks, self.layout = shape, num_blocks, layout
        g = torch.Generator().manual_seed(seed)
        if layout == "packed":
            pool = torch.randint(0, 256, (shape.layers, num_blocks, shape.layer_block_bytes()), dtype=torch.uint8,
                                 generator=g)
            self.tensors, self.block_dim = [pool], 1
        elif layout == "separate":
            self.tensors, self.block_dim = [], 0
            for _ in range(shape.layers):
                for _, s, dt in shape.pieces():
                    raw = torch.randint(0, 256, (num_blocks, int(np.prod(s)) * torch.empty(0, dtype=dt).element_size()),
                                        dtype=torch.uint8, generator=g)
                    self.tensors.append(raw.view(dt).view(num_blocks, *s))
        else:
            raise ValueError(layout)

    def regions(self):
        return [r for t in self.tensors for r in regions_from_tensor(t, self.block_dim)]

    def block_bytes(self, block: int) -> bytes:
        """Every byte of one block, in region order (what a host slot holds)."""
        if self.block_dim == 1:  # [layers, blocks, bytes]: one region per layer
            return self.tensors[0][:, block, :].contiguous().numpy().tobytes()
        return b"".join(t[block].contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in self.tensors)

    def scribble(self, blocks, seed: int = 1) -> None:
        """Overwrites blocks with fresh random bytes (what a reused GPU block holds)."""
        g = torch.Generator().manual_seed(seed)
        for t in self.tensors:
            for b in blocks:
                view = t.select(self.block_dim, b) if self.block_dim else t[b]
                raw = view.view(torch.uint8) if view.dtype != torch.uint8 else view
                raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))
