"""Registers every hook module with the post-import machinery. Each hook
module (hooks/) registers its own `when_imported` functions on import; none
of them imports LMDeploy, torch or numpy at module level."""
from __future__ import annotations

from . import import_hooks
from .compat import disabled_by_env

HOOK_MODULES = (
    "messages", "pytorch_config", "config_builder",              # settings as config fields
    "cli_utils", "cli_serve",                                    # CLI flags
    "archs", "pipeline", "serve_api_server", "serve_launch_server",  # TurboMind requests -> PyTorch engine
    "scheduler", "block_trie_node", "block_trie", "prefill_scheduler", "seq_states",  # scheduler side
    "executor_base", "inputs_maker", "model_agent", "engine",    # pool sizing, plans, rank stores
    "metrics_stats", "metrics_loggers",                          # /metrics
    "pytorch_messages", "block_trie_checkpoint", "serve_protocol", "async_engine",  # cache_salt
)


def install() -> None:
    if disabled_by_env():
        return
    import importlib

    for name in HOOK_MODULES:
        importlib.import_module(f"{__package__}.hooks.{name}")
    import_hooks.install()
