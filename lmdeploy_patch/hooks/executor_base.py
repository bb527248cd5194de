"""lmdeploy.pytorch.engine.executor.base.ExecutorBase._update_num_gpu_blocks:
sizes the host pool (pool_sizing.py), and names the store keys' namespace
after the model it serves. It runs once in the driver after the
GPU block count is final and before set_cache_config sends the config to the
workers, so every rank and the scheduler see the same slot count."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap


@wrap("lmdeploy.pytorch.engine.executor.base", "ExecutorBase._update_num_gpu_blocks",
      ["self", "free_mems", "cache_block_sizes", "spec_cache_config"])
def _update_num_gpu_blocks(original: Callable, self: Any, free_mems: Any, cache_block_sizes: Any,
                           spec_cache_config: Any) -> Any:
    result = original(self, free_mems, cache_block_sizes, spec_cache_config)
    from ..pool_sizing import size_host_pool

    size_host_pool(self.cache_config, [c.target for c in cache_block_sizes], spec_cache_config,
                   memory_model_cache=any(getattr(c, "memory", 0) for c in cache_block_sizes),
                   model_paradigm=getattr(getattr(self, "model_config", None), "model_paradigm", "ar"),
                   engines=max(1, int(getattr(self, "dp", 1) or 1)),
                   ranks_here=type(self).__name__ == "UniExecutor", model_config=getattr(self, "model_config", None),
                   tp=int(getattr(self.dist_config, "tp", 1) or 1),
                   adapters=getattr(getattr(self, "model_agent", None), "adapters", None))
    return result
