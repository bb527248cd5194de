"""`--host-cache`, `--host-cache-ratio`, `--host-cache-size`,
`--host-cache-write-policy`, `--host-cache-restore-policy`, `--host-cache-verify` and
`--host-cache-store` on the `lmdeploy` command line.

Where the flags go: LMDeploy builds its parsers at run time from
`cli.utils.ArgumentHelper` staticmethods, and every parser that configures a
KV cache calls `ArgumentHelper.enable_prefix_caching` (hooked in
hooks/cli_utils.py) (`lmdeploy chat` and
`lmdeploy serve api_server` in 0.18.0). Wrapping that one helper puts our flags
next to `--enable-prefix-caching` in each of them, and in any parser a later
LMDeploy or a user script builds the same way.

How the values travel: each flag stores into the config field of the same
name (`--host-cache` stores the default ratio into `host_cache_ratio`), and
the flags default to `argparse.SUPPRESS`, so the namespace has no host-cache
attribute unless a flag was given: with no flag, every command sees exactly
LMDeploy's own namespace.
- `lmdeploy chat` copies every namespace value onto the engine config with
  `setattr` when the config class has that attribute, which it now has.
- `lmdeploy serve api_server` builds the config with a fixed list of keywords;
  `SubCliServe.api_server` is wrapped (hooks/cli_serve.py) to hand the values
  to the next engine config built (`settings.defaults_for_next_config`). That config is the
  one the function builds before it calls `serve()` or, with dp > 1,
  `launch_server()`; taking the values at construction validates them and
  covers both paths (and the dp children, which get the config pickled)
  without depending on `serve`'s or `launch_server`'s signatures.

`--backend turbomind` given explicitly with any host-cache flag is a parse
error (exit 2): TurboMind cannot host the tier. `--backend` defaults to
`turbomind`, so "explicitly" is found out while parsing (see
`install_backend_check`); without `--backend`, the host-cache flags make the
PyTorch engine serve (turbomind_fallback.py).
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

from .compat import STATE
from .settings import (DEFAULT_HOST_CACHE_RATIO, DEFAULT_RESTORE_POLICY, DEFAULT_WRITE_POLICY, GIB, HOST_CACHE_FIELDS,
                       RESTORE_POLICIES, WRITE_POLICIES, DefaultRatio, check_ratio, check_size, check_store,
                       ram_reserve_bytes)

TURBOMIND_FLAG_ERROR = (
    "--backend turbomind cannot serve the host KV-cache tier (--host-cache*): TurboMind's compiled engine "
    "has no hooks to read or write KV blocks. Use --backend pytorch, or drop --backend and the host-cache "
    "flags select the PyTorch engine.")

HELP = {
    "--host-cache": (f"Turn on the host-memory (DRAM) KV-cache tier with the default ratio "
                     f"{DEFAULT_HOST_CACHE_RATIO}: a host pool per rank of {DEFAULT_HOST_CACHE_RATIO} x that "
                     f"rank's GPU KV-cache bytes, shrunk to fit the RAM left (one log line says so). Served by "
                     f"the PyTorch engine. --host-cache-ratio or --host-cache-size, when given, set the size "
                     f"instead."),
    "--host-cache-ratio": ("Host KV-cache pool per rank as a multiple of that rank's GPU KV-cache bytes; a "
                           "finite number >= 0, 0 = off. Default: 0 (off); --host-cache alone means "
                           f"{DEFAULT_HOST_CACHE_RATIO}."),
    "--host-cache-size": ("Host KV-cache pool per rank in GiB, overriding --host-cache-ratio; a finite number "
                          "> 0 that fits in the available RAM (the smaller of MemAvailable and this "
                          "process's cgroup limit less its use) minus a {reserve:g} GiB reserve. "
                          "Default: unset (use the ratio)."),
    "--host-cache-write-policy": ("When full KV blocks are copied to host memory: write_through (each full "
                                  "block once computed), write_through_selective (blocks the GPU cache "
                                  "served, and those it evicts while turns are being continued), "
                                  f"write_back (when the GPU evicts it). Default: {DEFAULT_WRITE_POLICY}."),
    "--host-cache-restore-policy": ("Whether a host hit is copied back or recomputed: auto (restore when the "
                                    "copy, behind the restore stream's backlog, is estimated faster than "
                                    "recomputing the tokens at this engine's measured prefill rate), always, "
                                    f"never. Default: {DEFAULT_RESTORE_POLICY}."),
    "--host-cache-verify": ("Checksum every block saved to host memory and check it before the block is "
                            "restored: a block whose bytes changed is dropped from the host cache and "
                            "recomputed (costs a hash per saved and restored block). Default: off."),
    "--host-cache-store": ("A Mooncake Store behind the host pool, shared by every engine given the same file: "
                           "the path of its JSON config (metadata_server, master_server_address, protocol tcp or "
                           "rdma, segment sizes; the format LMDeploy's Mooncake connector reads). Turns "
                           "--host-cache on when no size is given. Default: unset (host memory only)."),
}


class _NotGiven:
    """Stands in for `--backend`'s default while a parser runs, to tell an
    explicit `--backend turbomind` from the default. Prints as the real
    default, since `--help` is rendered during that parse."""

    def __init__(self, shown: object) -> None:
        self._shown = shown

    def __str__(self) -> str:
        return str(self._shown)

    __repr__ = __str__


def _number_type(check: Callable[[object, str], Any], flag: str) -> Callable[[str], Any]:
    """An argparse `type`: a number checked like the config field, with the
    flag's name in the message (argparse prints it and exits with 2)."""

    def convert(text: str) -> Any:
        import argparse

        try:
            value: object = float(text)
        except ValueError:
            value = text  # `check` refuses it, naming the accepted range
        try:
            return check(value, flag)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = "float"  # what DefaultsAndTypesHelpFormatter and argparse errors show
    return convert


def _text_type(check: Callable[[object, str], Any], flag: str) -> Callable[[str], Any]:
    """An argparse `type` for a text value checked like its config field."""

    def convert(text: str) -> Any:
        import argparse

        try:
            return check(text, flag)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = "path"
    return convert


@functools.lru_cache(maxsize=None)
def _switch_action() -> type:
    """The `--host-cache` action class (built lazily: argparse is not imported
    at interpreter start)."""
    import argparse

    class HostCacheSwitch(argparse.Action):
        def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
            kwargs["nargs"] = 0
            super().__init__(option_strings, dest, **kwargs)

        def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
            # An explicit --host-cache-ratio wins whichever comes first.
            if not hasattr(namespace, self.dest):
                setattr(namespace, self.dest, DefaultRatio(DEFAULT_HOST_CACHE_RATIO))

    return HostCacheSwitch


@functools.lru_cache(maxsize=None)
def _store_action() -> type:
    """`--host-cache-store PATH`: also what `--host-cache` sets, unless a ratio was given (a size wins anyway)."""
    import argparse

    class HostCacheStore(argparse.Action):
        def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
            setattr(namespace, self.dest, values)
            if not hasattr(namespace, "host_cache_ratio"):
                setattr(namespace, "host_cache_ratio", DefaultRatio(DEFAULT_HOST_CACHE_RATIO))

    return HostCacheStore


def _reserve_gib_for_help() -> float:
    """The reserve the help text shows. A bad HOSTCACHE_RAM_RESERVE_GIB is
    refused when an engine sizes its pool, not while every lmdeploy command
    builds its parsers."""
    try:
        return ram_reserve_bytes() / GIB
    except ValueError:
        from lmdeploy_hostcache.config import DEFAULT_RESERVE_BYTES

        return DEFAULT_RESERVE_BYTES / GIB


def add_host_cache_arguments(container: Any) -> None:
    """Adds the host-cache flags to a parser or argument group (once)."""
    import argparse

    if "--host-cache" in getattr(container, "_option_string_actions", {}):
        return
    hidden = argparse.SUPPRESS
    container.add_argument("--host-cache", action=_switch_action(), dest="host_cache_ratio", default=hidden,
                           help=HELP["--host-cache"])
    container.add_argument("--host-cache-ratio", dest="host_cache_ratio", metavar="R", default=hidden,
                           type=_number_type(check_ratio, "--host-cache-ratio"), help=HELP["--host-cache-ratio"])
    container.add_argument("--host-cache-size", dest="host_cache_size", metavar="GIB", default=hidden,
                           type=_number_type(check_size, "--host-cache-size"),
                           help=HELP["--host-cache-size"].format(reserve=_reserve_gib_for_help()))
    container.add_argument("--host-cache-write-policy", dest="host_cache_write_policy", choices=WRITE_POLICIES,
                           default=hidden, help=HELP["--host-cache-write-policy"])
    container.add_argument("--host-cache-restore-policy", dest="host_cache_restore_policy",
                           choices=RESTORE_POLICIES, default=hidden, help=HELP["--host-cache-restore-policy"])
    container.add_argument("--host-cache-verify", dest="host_cache_verify", action="store_const", const=True,
                           default=hidden, help=HELP["--host-cache-verify"])
    container.add_argument("--host-cache-store", dest="host_cache_store", metavar="PATH", default=hidden,
                           action=_store_action(), type=_text_type(check_store, "--host-cache-store"),
                           help=HELP["--host-cache-store"])


def given_host_cache_values(args: Any) -> dict[str, Any]:
    """The host-cache values present on an argparse namespace (flags given)."""
    return {name: getattr(args, name) for name in HOST_CACHE_FIELDS if hasattr(args, name)}


# --------------------------------------------------------------------------
# Explicit `--backend turbomind` with a host-cache flag: parse error
# --------------------------------------------------------------------------

def owning_parser(container: Any) -> Any:
    """The parser a container belongs to: itself, or for an argument group the
    parser in LMDeploy's CLI tree sharing its action list (groups keep no
    reference to their parser)."""
    import argparse

    if isinstance(container, argparse.ArgumentParser):
        return container
    cli = getattr(sys.modules.get("lmdeploy.cli.cli"), "CLI", None)
    root = getattr(cli, "parser", None)
    actions = getattr(container, "_actions", None)
    return _find_parser(root, actions) if root is not None and actions is not None else None


def _find_parser(parser: Any, actions: list) -> Any:
    # argparse internals (stable since Python 2.7), read with getattr so that a
    # change costs the explicit-backend check, never the CLI.
    own = getattr(parser, "_actions", [])
    if own is actions:
        return parser
    for action in own:
        for sub in getattr(action, "_name_parser_map", {}).values():
            found = _find_parser(sub, actions)
            if found is not None:
                return found
    return None


def install_backend_check(parser: Any) -> None:
    """Wraps this parser's `parse_known_args` (an instance attribute; the
    subcommand dispatch calls it) so that an explicit `--backend turbomind`
    with a host-cache flag ends in `parser.error`. While it parses, `--backend`'s
    default is a marker: left in place means the flag was not given."""
    backend = getattr(parser, "_option_string_actions", {}).get("--backend")
    if backend is None or "parse_known_args" in vars(parser):
        return
    original = parser.parse_known_args

    def parse_known_args(args: Any = None, namespace: Any = None) -> tuple[Any, list[str]]:
        default = backend.default
        marker = backend.default = _NotGiven(default)
        try:
            parsed, extras = original(args, namespace)
        finally:
            backend.default = default
        if getattr(parsed, backend.dest, None) is marker:
            setattr(parsed, backend.dest, default)
        elif getattr(parsed, backend.dest, None) == "turbomind" and given_host_cache_values(parsed):
            parser.error(TURBOMIND_FLAG_ERROR)
        return parsed, extras

    STATE.patcher.setattr(parser, "parse_known_args", parse_known_args)
