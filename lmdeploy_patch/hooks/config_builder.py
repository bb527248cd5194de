"""lmdeploy.pytorch.engine.config_builder: ConfigBuilder.build_cache_config
copies a fixed list of fields from the engine config into CacheConfig
(Engine.__init__ calls it through the class, so replacing the staticmethod
on the class is seen); without this hook the workers never get our values."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap
from ..settings import copy_host_cache_fields


@wrap("lmdeploy.pytorch.engine.config_builder", "ConfigBuilder.build_cache_config", ["engine_config"],
      kind="staticmethod")
def build_cache_config(original: Callable, engine_config: Any) -> Any:
    cache_config = original(engine_config)
    copy_host_cache_fields(engine_config, cache_config)
    return cache_config
