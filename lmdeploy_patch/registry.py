"""The hook modules, registered with the post-import machinery. Each hook
module registers its own `when_imported` functions on import; none of them
imports LMDeploy, torch or numpy at module level."""
from __future__ import annotations

from . import import_hooks
from .compat import disabled_by_env


def install() -> None:
    if disabled_by_env():
        return
    from . import (cli_flags, config_fields, engine_hooks, metrics_hooks,  # noqa: F401 - registration side effects
                   trie_hooks, turbomind_fallback)

    import_hooks.install()
