"""lmdeploy.cli.utils: ArgumentHelper.enable_prefix_caching is the one helper
every KV-cache-configuring parser calls, so the host-cache flags are added
there (cli_flags.py says why and how they travel)."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap


@wrap("lmdeploy.cli.utils", "ArgumentHelper.enable_prefix_caching", ["parser"], kind="staticmethod")
def enable_prefix_caching(original: Callable, parser: Any) -> Any:
    from ..cli_flags import add_host_cache_arguments, install_backend_check, owning_parser

    action = original(parser)  # LMDeploy appends this action to its TurboMind group: return it as is
    add_host_cache_arguments(parser)
    owner = owning_parser(parser)
    if owner is not None:
        install_backend_check(owner)
    return action
