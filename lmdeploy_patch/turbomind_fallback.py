"""A TurboMind request for the host tier is served by the PyTorch engine.

TurboMind's engine is compiled (`_turbomind*.so`) and offers no hook to read,
write or index KV blocks, so it cannot host the tier. When a
`TurbomindEngineConfig` (or the `turbomind` backend LMDeploy picks by default)
comes with the tier on, the PyTorch engine serves it with the same settings,
and one warning line says why, as LMDeploy itself does for models TurboMind
lacks.

Three ways in, three hooks:
- pipeline: `archs.autoget_backend_config` (called by `Pipeline.__init__`)
  returns ('pytorch', converted config) (hooks/archs.py, hooks/pipeline.py).
- `lmdeploy serve api_server`: `SubCliServe.api_server` picks the backend
  itself (`autoget_backend`, default `turbomind`) and never calls
  `autoget_backend_config`; with the tier on it is switched to `pytorch`
  before LMDeploy chooses (hooks/cli_serve.py). (An explicit `--backend
  turbomind` with a host-cache flag never gets here: cli_flags.py makes it a
  parse error.)
- programmatic `serve(..., backend='turbomind', backend_config=...)` in
  `serve.openai.api_server`: converted at the call (hooks/serve_api_server.py,
  hooks/serve_launch_server.py).
With the tier off, each hook calls LMDeploy's function with the same arguments.
"""
from __future__ import annotations

import sys
from typing import Any

from .log import logger
from .settings import copy_host_cache_fields

FALLBACK_WARNING = (
    "lmdeploy-hostcache: %s asks for the host KV-cache tier, which TurboMind cannot host (its compiled "
    "engine has no KV-cache hooks); serving with the PyTorch engine and the same settings")


def warn_fallback(what: str) -> None:
    logger.warning(FALLBACK_WARNING, what)


def is_turbomind_config(cfg: Any) -> bool:
    messages = sys.modules.get("lmdeploy.messages")
    return messages is not None and isinstance(cfg, messages.TurbomindEngineConfig)


def turbomind_to_pytorch(tm_config: Any) -> Any:
    """A `PytorchEngineConfig` carrying `tm_config`'s settings.

    The same rule as LMDeploy's own fallback in `archs.autoget_backend_config`
    (truthy values of the fields both configs have, and
    `cache_block_seq_len` -> `block_size`), so that a fallback decided here
    equals one LMDeploy decides (the tests compare the two). It is rebuilt
    rather than reached through LMDeploy's function because that converts only
    when `autoget_backend` says 'pytorch'. Then the host-cache fields are set
    whatever their truthiness."""
    from dataclasses import asdict

    from lmdeploy.messages import PytorchEngineConfig

    config = PytorchEngineConfig()
    for key, value in asdict(tm_config).items():
        if value and hasattr(config, key):
            setattr(config, key, value)
    config.block_size = tm_config.cache_block_seq_len
    copy_host_cache_fields(tm_config, config)
    return config
