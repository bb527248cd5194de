"""lmdeploy.pytorch.paging.block_trie.trie.BlockTrie: the match continues in
host memory where the GPU trie stops; the tier notes fresh blocks before
LMDeploy's dedup, new adapter roots, and evictions.

Why safe: _match_block_prefix runs after LMDeploy's own match has taken its
references, and the tier only advances the step past host hits, as a GPU hit
does; allocate: the tier records the fresh block ids before LMDeploy's dedup
may swap them for another sequence's; evict: only notes that trie-owned
blocks were freed (the next forward must then wait for earlier saves,
copy_plan.HostCopyPlan.wait_saves)."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap

TRIE = "lmdeploy.pytorch.paging.block_trie.trie"


def _tier(trie: Any):
    from ..scheduler_tier import tier_of

    return tier_of(trie)


@wrap(TRIE, "BlockTrie._match_block_prefix", ["self", "seq"])
def _match_block_prefix(original: Callable, self: Any, seq: Any) -> Any:
    tier = _tier(self)
    if tier is None:
        return original(self, seq)
    start = seq.prefix_cache.trie_cursor
    original(self, seq)
    if tier.write_policy == "write_through_selective":
        node, hits = seq.prefix_cache.trie_cursor, []
        while node is not None and node is not start and node.parent is not None:
            hits.append(node)
            node = node.parent
        tier.on_gpu_hits(hits)
    tier.continue_match(self, seq)


@wrap(TRIE, "BlockTrie.allocate", ["self", "seq"])
def allocate(original: Callable, self: Any, seq: Any) -> Any:
    tier = _tier(self)
    if tier is not None:
        tier.before_trie_allocate(seq)
    return original(self, seq)


@wrap(TRIE, "BlockTrie._get_or_create_root", ["self", "adapter_name"])
def _get_or_create_root(original: Callable, self: Any, adapter_name: Any) -> Any:
    root = original(self, adapter_name)
    tier = _tier(self)
    if tier is not None:
        tier.add_root(root)
    return root


@wrap(TRIE, "BlockTrie.evict", ["self", "max_num_blocks"])
def evict(original: Callable, self: Any, max_num_blocks: Any) -> Any:
    evicted = original(self, max_num_blocks)
    tier = _tier(self)
    if tier is not None and evicted:
        # Every way a trie-owned block is freed goes through here
        # (detach_leaf is skipped for a stale detached leaf).
        tier.note_evicted()
    return evicted
