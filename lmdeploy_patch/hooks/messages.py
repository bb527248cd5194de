"""lmdeploy.messages: the user-facing engine configs get the host-cache
fields (config_fields.py). Validation includes the RAM check for
host_cache_size; these configs take the CLI's pending values."""
from __future__ import annotations

from typing import Any

from ..compat import apply, require_attr
from ..import_hooks import when_imported


@when_imported("lmdeploy.messages")
def _on_import(module: Any) -> None:
    def patch() -> None:
        from ..config_fields import add_host_cache_fields

        for name in ("PytorchEngineConfig", "TurbomindEngineConfig"):
            cls = require_attr(module, name, "lmdeploy.messages")
            add_host_cache_fields(cls, f"lmdeploy.messages.{name}", check_ram=True, takes_pending=True)

    apply("lmdeploy.messages:engine config fields", patch)
