"""What 'balanced' means once every sequence is gone, for LMDeploy's block
allocator and the host tier: no pinned host slot, no planned copy left over,
no per-sequence state kept, no GPU block held by anything but the prefix trie. Shared by the simulator
tests (tests/lmdeploy) and the real-engine tests (tests/engine)."""
from __future__ import annotations

from typing import Any, Optional


def balance_problems(scheduler: Any, tier: Optional[Any]) -> list[str]:
    """Empty when balanced; else one line per broken rule."""
    problems: list[str] = []
    bm = scheduler.block_manager
    trie_nodes = 0
    stack = list(scheduler.block_trie._roots.values())
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if node.parent is not None:
            trie_nodes += 1
            refs = int(bm.allocator.get_ref_count(node.block_id))
            if refs != 1:
                problems.append(f"trie block {node.block_id} has {refs} references, expected 1 (the trie's)")
    cc = scheduler.cache_config
    usable = cc.num_gpu_blocks - cc.num_reserved_gpu_blocks
    free = bm.get_num_free_gpu_blocks()
    if free + trie_nodes != usable:
        problems.append(f"GPU blocks leaked: {free} free + {trie_nodes} in the trie != {usable} usable")
    if tier is not None and tier.store is not None and not tier.store.drain(tier.index, tier._ledgers()):
        problems.append("store puts or fetches still running 10 s after the engine went idle")
    if tier is not None:
        ix = tier.index
        try:
            ix.check_invariants()
        except Exception as e:  # noqa: BLE001 - reported as a problem
            problems.append(f"host index invariant broken: {e}")
        pinned = [s for s in range(ix.capacity) if ix.pins(s)]
        if pinned:
            problems.append(f"{len(pinned)} host slots still pinned (first: {pinned[:8]})")
        if tier._restores or tier._pre:
            problems.append(f"copies left planned: {len(tier._restores)} restores, {len(tier._pre)} pre saves")
        kept = {"tails": len(tier._tails), "released": len(tier._released), "queried": len(tier._queried),
                "lost-hit notes": len(tier.lost._pending)}
        if any(kept.values()):
            problems.append(f"per-sequence state left after every sequence ended: {kept}")
    return problems
