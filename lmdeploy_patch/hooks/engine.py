"""lmdeploy.pytorch.engine.engine.Engine.sleep: the ranks dropped their stores
with the KV pools (hooks/model_agent.py), so the scheduler side forgets every
host entry: the stores built at wakeup start empty. LMDeploy 0.18.0 keeps its
prefix trie over a sleep although the pools its blocks lived in are released
(wakeup allocates new ones, for new weights perhaps): with the tier on, the
trie is emptied too, so no GPU hit after the wakeup reads what the new pools
happen to hold. Sleep ended every session first, so every trie block is the
trie's alone and evictable."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap


@wrap("lmdeploy.pytorch.engine.engine", "Engine.sleep", ["self", "level"])
async def sleep(original: Callable, self: Any, level: int = 1) -> Any:
    result = await original(self, level)
    from ..scheduler_tier import tier_of

    tier = tier_of(getattr(self, "scheduler", None))
    if tier is not None:
        tier.reset()  # first: the evicted blocks are then never saved (HostTier.reset)
        self.scheduler.block_trie.evict(self.scheduler.cache_config.num_gpu_blocks)
    return result
