"""lmdeploy.cli.serve: SubCliServe.api_server picks the backend itself and
builds the engine config with explicit keywords. With the tier on, the
backend LMDeploy would pick by default (turbomind) becomes pytorch before it
chooses (turbomind_fallback.py), and the parsed host-cache values are handed
to the next engine config built (cli_flags.py).

`set_defaults(run=SubCliServe.api_server)` runs when the parser is built,
after this patch, so the CLI calls the wrapper."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap
from ..settings import defaults_for_next_config, host_cache_requested


@wrap("lmdeploy.cli.serve", "SubCliServe.api_server", ["args"], kind="staticmethod")
def api_server(original: Callable, args: Any) -> Any:
    from ..cli_flags import given_host_cache_values

    if host_cache_requested(args) and getattr(args, "backend", "pytorch") != "pytorch":
        from ..turbomind_fallback import warn_fallback

        warn_fallback(f"`lmdeploy serve api_server` (backend {args.backend!r} by default)")
        args.backend = "pytorch"
    values = given_host_cache_values(args)
    if not values:
        return original(args)
    with defaults_for_next_config(values):
        return original(args)
