"""lmdeploy.messages: the user-facing engine configs get the host-cache
fields (config_fields.py). Validation includes the RAM check for
host_cache_size; these configs take the CLI's pending values.
GenerationConfig gets `cache_salt` (cache_salt.py): a real dataclass field,
so LMDeploy's server picks it from a request like its own fields
(serve.core.generation_config lists GenerationConfig's fields when it is
imported, after this)."""
from __future__ import annotations

from typing import Any

from ..compat import apply, require_attr
from ..import_hooks import when_imported


@when_imported("lmdeploy.messages")
def _on_import(module: Any) -> None:
    def patch() -> None:
        from typing import Optional

        from ..config_fields import add_checked_field, add_host_cache_fields
        from ..cache_salt import check_salt

        for name in ("PytorchEngineConfig", "TurbomindEngineConfig"):
            cls = require_attr(module, name, "lmdeploy.messages")
            add_host_cache_fields(cls, f"lmdeploy.messages.{name}", check_ram=True, takes_pending=True)
        gen = require_attr(module, "GenerationConfig", "lmdeploy.messages")
        add_checked_field(gen, "lmdeploy.messages.GenerationConfig", "cache_salt", None, Optional[str], check_salt)

    apply("lmdeploy.messages:engine config fields", patch)
