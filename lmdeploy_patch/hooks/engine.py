"""lmdeploy.pytorch.engine.engine.Engine.sleep: the ranks dropped their stores
with the KV pools (hooks/model_agent.py), so the scheduler side forgets every
host entry: the stores built at wakeup start empty."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap


@wrap("lmdeploy.pytorch.engine.engine", "Engine.sleep", ["self", "level"])
async def sleep(original: Callable, self: Any, level: int = 1) -> Any:
    result = await original(self, level)
    from ..scheduler_tier import tier_of

    tier = tier_of(getattr(self, "scheduler", None))
    if tier is not None:
        tier.reset()
    return result
