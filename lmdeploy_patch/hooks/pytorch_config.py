"""lmdeploy.pytorch.config.CacheConfig: what the executor pushes to every
worker (pickled), so the workers see the host-cache settings. No RAM check
here: the user-facing config was checked; the driver checks the real pool
(pool_sizing.py)."""
from __future__ import annotations

from typing import Any

from ..compat import apply, require_attr
from ..import_hooks import when_imported


@when_imported("lmdeploy.pytorch.config")
def _on_import(module: Any) -> None:
    def patch() -> None:
        from ..config_fields import add_host_cache_fields

        cls = require_attr(module, "CacheConfig", "lmdeploy.pytorch.config")
        add_host_cache_fields(cls, "lmdeploy.pytorch.config.CacheConfig", check_ram=False, takes_pending=False)

    apply("lmdeploy.pytorch.config:CacheConfig fields", patch)
