"""lmdeploy.pytorch.paging.block_trie.node.Node: a trie edge attaches (the
tier keys the node and queues its write-through save) or a leaf is evicted
(write-back saves it). With the tier off, the wrappers only call through.

Why safe: attach_to runs after the edge exists and the tier only records
the node (scheduler_tier.NodeRecord, kept off the node) and queues work for
the next plan; detach_leaf runs before the edge goes, and the block is freed
only at the end of the eviction pass, so its physical id is still valid."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap

NODE = "lmdeploy.pytorch.paging.block_trie.node"


@wrap(NODE, "Node.attach_to", ["self", "parent"])
def attach_to(original: Callable, self: Any, parent: Any) -> Any:
    result = original(self, parent)
    from ..scheduler_tier import record_of

    parent_record = record_of(parent)
    if parent_record is not None:
        parent_record.tier.on_attach(self, parent_record)
    return result


@wrap(NODE, "Node.detach_leaf", ["self"])
def detach_leaf(original: Callable, self: Any) -> Any:
    from ..scheduler_tier import record_of

    record = record_of(self)
    if record is not None and self.parent is not None and not self.children:
        record.tier.on_evict(self)
    return original(self)
