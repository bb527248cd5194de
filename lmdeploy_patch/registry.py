"""The hook modules, registered with the post-import machinery. Each hook
module registers its own `when_imported` functions on import; none of them
imports LMDeploy, torch or numpy at module level."""
from __future__ import annotations

import os

from . import import_hooks


def install() -> None:
    if os.environ.get("LMDEPLOY_HOSTCACHE_DISABLE", "") in ("1", "true", "yes"):
        return
    from . import (cli_flags, config_fields, engine_hooks, metrics_hooks,  # noqa: F401 - registration side effects
                   trie_hooks, turbomind_fallback)

    import_hooks.install()
