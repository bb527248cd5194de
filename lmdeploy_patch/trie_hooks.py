"""Hooks on LMDeploy 0.18.0's scheduler side: the block trie, admission
rollback and sequence release. Each wrapper calls LMDeploy's own function
and then tells the engine's HostTier (host_tier.py) what happened; with the
tier off (no `_hc_tier` on the trie) the wrappers only call through.

Why each hook is safe:
- Node.attach_to: runs after the edge exists; we only add attributes to the
  node (Node has no __slots__) and queue work for the next plan.
- Node.detach_leaf: runs before the edge goes; the block is freed only at the
  end of the eviction pass, so its physical id is still valid here.
- BlockTrie._match_block_prefix: runs after LMDeploy's own match has taken
  its references; we only advance the step past host hits, as a GPU hit does.
- BlockTrie.allocate: we record the fresh block ids before LMDeploy's
  dedup may swap them for another sequence's blocks.
- BlockTrie.evict: only notes that trie-owned blocks were freed (the next
  forward must then wait for earlier saves, HostCopyPlan.wait_saves).
- rollback / release_paging_resources: the sequence gives its blocks back;
  we drop the slot pins of a restore that will never be planned.
- Scheduler.__init__: builds the tier once the trie and allocator exist.
"""
from __future__ import annotations

from typing import Any

from .compat import STATE, apply, hooked, require_attr
from .import_hooks import when_imported


def tier_of(owner: Any):
    return owner.__dict__.get("_hc_tier") if hasattr(owner, "__dict__") else None


@when_imported("lmdeploy.pytorch.paging.block_trie.node")
def _patch_node(module) -> None:
    def patch() -> None:
        Node = require_attr(module, "Node", "lmdeploy.pytorch.paging.block_trie.node")
        attach = hooked(Node, "attach_to", ["self", "parent"], "Node")
        detach = hooked(Node, "detach_leaf", ["self"], "Node")

        def attach_to(self, parent):
            attach(self, parent)
            tier = tier_of(parent)
            if tier is not None:
                self._hc_tier = tier
                tier.on_attach(self, parent)

        def detach_leaf(self):
            tier = tier_of(self)
            if tier is not None and self.parent is not None and not self.children:
                tier.on_evict(self)
            return detach(self)

        STATE.patcher.setattr(Node, "attach_to", attach_to)
        STATE.patcher.setattr(Node, "detach_leaf", detach_leaf)

    apply("trie.node", patch)


@when_imported("lmdeploy.pytorch.paging.block_trie.trie")
def _patch_trie(module) -> None:
    def patch() -> None:
        BlockTrie = require_attr(module, "BlockTrie", "lmdeploy.pytorch.paging.block_trie.trie")
        match = hooked(BlockTrie, "_match_block_prefix", ["self", "seq"], "BlockTrie")
        allocate = hooked(BlockTrie, "allocate", ["self", "seq"], "BlockTrie")
        get_root = hooked(BlockTrie, "_get_or_create_root", ["self", "adapter_name"], "BlockTrie")
        evict = hooked(BlockTrie, "evict", ["self", "max_num_blocks"], "BlockTrie")

        def _match_block_prefix(self, seq):
            tier = tier_of(self)
            if tier is None:
                return match(self, seq)
            start = seq.prefix_cache.trie_cursor
            match(self, seq)
            if tier.write_policy == "write_through_selective":
                node, hits = seq.prefix_cache.trie_cursor, []
                while node is not None and node is not start and node.parent is not None:
                    hits.append(node)
                    node = node.parent
                tier.on_gpu_hits(hits)
            tier.continue_match(self, seq)

        def allocate_(self, seq):
            tier = tier_of(self)
            if tier is not None:
                tier.before_trie_allocate(seq)
            return allocate(self, seq)

        def _get_or_create_root(self, adapter_name):
            root = get_root(self, adapter_name)
            tier = tier_of(self)
            if tier is not None and "_hc_tier" not in root.__dict__:
                root._hc_tier = tier
            return root

        def evict_(self, max_num_blocks):
            evicted = evict(self, max_num_blocks)
            tier = tier_of(self)
            if tier is not None and evicted:
                # Every way a trie-owned block is freed goes through here
                # (detach_leaf is skipped for a stale detached leaf).
                tier.note_evicted()
            return evicted

        STATE.patcher.setattr(BlockTrie, "evict", evict_)
        STATE.patcher.setattr(BlockTrie, "_match_block_prefix", _match_block_prefix)
        STATE.patcher.setattr(BlockTrie, "allocate", allocate_)
        STATE.patcher.setattr(BlockTrie, "_get_or_create_root", _get_or_create_root)

    apply("trie.match", patch)


@when_imported("lmdeploy.pytorch.paging.prefill_scheduler")
def _patch_rollback(module) -> None:
    def patch() -> None:
        Tentative = require_attr(module, "_TentativePrefixMatch", "lmdeploy.pytorch.paging.prefill_scheduler")
        rollback = hooked(Tentative, "rollback", ["self", "reason"], "_TentativePrefixMatch")

        def rollback_(self, reason):
            tier = tier_of(self.block_trie)
            if tier is not None:
                tier.cancel(self.seq)
            return rollback(self, reason)

        STATE.patcher.setattr(Tentative, "rollback", rollback_)

    apply("admission.rollback", patch)


@when_imported("lmdeploy.pytorch.paging.seq_states.states")
def _patch_release(module) -> None:
    def patch() -> None:
        Lifecycle = require_attr(module, "SequenceLifecycle", "lmdeploy.pytorch.paging.seq_states.states")
        release = hooked(Lifecycle, "release_paging_resources", ["self", "seq"], "SequenceLifecycle")

        def release_paging_resources(self, seq):
            tier = tier_of(self)
            if tier is not None:
                tier.cancel(seq)
            return release(self, seq)

        STATE.patcher.setattr(Lifecycle, "release_paging_resources", release_paging_resources)

    apply("sequence.release", patch)


@when_imported("lmdeploy.pytorch.paging.scheduler")
def _patch_scheduler(module) -> None:
    def patch() -> None:
        Scheduler = require_attr(module, "Scheduler", "lmdeploy.pytorch.paging.scheduler")
        init = hooked(Scheduler, "__init__", ["self", "scheduler_config", "cache_config"], "Scheduler")

        def __init__(self, scheduler_config, cache_config, *args, **kwargs):
            from .engine_setup import prepare_scheduler_cache_config, attach_scheduler_tier

            prepare_scheduler_cache_config(cache_config)
            init(self, scheduler_config, cache_config, *args, **kwargs)
            attach_scheduler_tier(self)

        STATE.patcher.setattr(Scheduler, "__init__", __init__)

    apply("scheduler.init", patch)
