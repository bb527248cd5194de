"""Test support, not product: a reproducible LRU for LMDeploy 0.18.0's
prefix cache in the engine processes. Its allocator stores
`time.perf_counter()` in an int64 array (block_manager/base_block_manager.py),
so blocks touched within the same second tie and the eviction heap breaks
the tie by `id(node)`, a memory address: which prefix a full GPU cache
drops first then depends on how fast the machine ran the requests. A test
that floods the cache and expects the oldest prompt to be gone (and served
from host memory) failed on a machine that ran the whole flood within one
second. The replay has the same need and the same cure
(benchmark/engine_loop.py LogicalClock): a counter for that module's clock,
so the least recently used block is always the one evicted. Loaded by
sitecustomize.py when HOSTCACHE_TEST_LOGICAL_LRU=1.
"""
from __future__ import annotations


def install() -> None:
    from benchmark.engine_loop import use_logical_clock

    use_logical_clock()
