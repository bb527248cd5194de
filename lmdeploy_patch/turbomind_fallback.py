"""A TurboMind request for the host tier is served by the PyTorch engine.

TurboMind's engine is compiled (`_turbomind*.so`) and offers no hook to read,
write or index KV blocks, so it cannot host the tier. When a
`TurbomindEngineConfig` (or the `turbomind` backend LMDeploy picks by default)
comes with the tier on, the PyTorch engine serves it with the same settings,
and one warning line says why, as LMDeploy itself does for models TurboMind
lacks.

Three ways in, three hooks:
- pipeline: `archs.autoget_backend_config` (called by `Pipeline.__init__`)
  returns ('pytorch', converted config).
- `lmdeploy serve api_server`: `SubCliServe.api_server` picks the backend
  itself (`autoget_backend`, default `turbomind`) and never calls
  `autoget_backend_config`; with the tier on it is switched to `pytorch`
  before LMDeploy chooses. (An explicit `--backend turbomind` with a
  host-cache flag never gets here: cli_flags.py makes it a parse error.)
- programmatic `serve(..., backend='turbomind', backend_config=...)` in
  `serve.openai.api_server`: converted at the call.
With the tier off, each hook calls LMDeploy's function with the same arguments.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

from .compat import STATE, apply, hooked, require_attr
from .config_fields import copy_host_cache_fields, host_cache_requested, wrap_staticmethod
from .import_hooks import initialising, when_imported

LOGGER_NAME = "lmdeploy_hostcache"
FALLBACK_WARNING = (
    "lmdeploy-hostcache: %s asks for the host KV-cache tier, which TurboMind cannot host (its compiled "
    "engine has no KV-cache hooks); serving with the PyTorch engine and the same settings")


def warn_fallback(what: str) -> None:
    import logging

    logging.getLogger(LOGGER_NAME).warning(FALLBACK_WARNING, what)


def _is_turbomind_config(cfg: Any) -> bool:
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


def _wrap_autoget_backend_config(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def autoget_backend_config(model_path: str, backend_config: Any = None, trust_remote_code: bool = False) -> Any:
        if _is_turbomind_config(backend_config) and host_cache_requested(backend_config):
            warn_fallback("TurbomindEngineConfig")
            return "pytorch", turbomind_to_pytorch(backend_config)
        return original(model_path, backend_config, trust_remote_code=trust_remote_code)

    return autoget_backend_config


def _wrap_api_server(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    @functools.wraps(original)  # keeps __doc__: LMDeploy uses it as the subcommand's help
    def api_server(args: Any) -> Any:
        if host_cache_requested(args) and getattr(args, "backend", "pytorch") != "pytorch":
            warn_fallback(f"`lmdeploy serve api_server` (backend {args.backend!r} by default)")
            args.backend = "pytorch"
        return original(args)

    return api_server


def _wrap_serve(original: Callable[..., Any]) -> Callable[..., Any]:
    import inspect

    signature = inspect.signature(original)
    default_backend = signature.parameters["backend"].default

    @functools.wraps(original)
    def serve(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind_partial(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)  # let LMDeploy report the bad call
        config = bound.arguments.get("backend_config")
        backend = bound.arguments.get("backend", default_backend)
        if backend == "pytorch" or not host_cache_requested(config):
            return original(*args, **kwargs)
        warn_fallback(f"serve(backend={backend!r}) with {type(config).__name__}")
        bound.arguments["backend"] = "pytorch"
        if _is_turbomind_config(config):
            bound.arguments["backend_config"] = turbomind_to_pytorch(config)
        return original(*bound.args, **bound.kwargs)

    return serve


# --------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------

def rebind_by_name(module: Any, name: str, wrapper: Callable[..., Any]) -> None:
    """`module` bound `name` with `from ... import name`; make it `wrapper`
    through the patcher so that a revert restores LMDeploy's original.
    If the module imported after our patch it already holds the wrapper: put
    the original back first, so that the patcher records the original as the
    value to restore."""
    original = getattr(wrapper, "__wrapped__", None)
    bound = getattr(module, name, None)
    if original is None or bound not in (original, wrapper):
        return  # someone else's binding: leave it
    if bound is wrapper:
        setattr(module, name, original)  # what LMDeploy would have bound without us
    STATE.patcher.setattr(module, name, wrapper)


def _rebind_from(module: Any, name: str, source_module: str) -> None:
    source = sys.modules.get(source_module)
    if source is not None:
        rebind_by_name(module, name, getattr(source, name))


# lmdeploy.archs: the pipeline's backend choice. `pipeline.py` binds the
# function by name (`from .archs import autoget_backend_config`) while it
# imports archs, right after this hook ran, so the pipeline hook below records
# that binding too.
@when_imported("lmdeploy.archs")
def _on_archs(module: Any) -> None:
    def patch() -> None:
        require_attr(module, "autoget_backend", "lmdeploy.archs")
        original = hooked(module, "autoget_backend_config", ["model_path", "backend_config", "trust_remote_code"],
                          "lmdeploy.archs")
        require_attr(require_attr(module, "TurbomindEngineConfig", "lmdeploy.archs"), "cache_block_seq_len",
                     "lmdeploy.messages.TurbomindEngineConfig")
        require_attr(require_attr(module, "PytorchEngineConfig", "lmdeploy.archs"), "block_size",
                     "lmdeploy.messages.PytorchEngineConfig")
        STATE.patcher.setattr(module, "autoget_backend_config", _wrap_autoget_backend_config(original))
        pipeline = sys.modules.get("lmdeploy.pipeline")
        if pipeline is not None and not initialising(pipeline):
            rebind_by_name(pipeline, "autoget_backend_config", module.autoget_backend_config)

    apply("turbomind_fallback.autoget_backend_config", patch)


@when_imported("lmdeploy.pipeline")
def _on_pipeline(module: Any) -> None:
    apply("turbomind_fallback.pipeline", lambda: _rebind_from(module, "autoget_backend_config", "lmdeploy.archs"))


# lmdeploy.cli.serve: the CLI's backend choice for the API server (see the
# module docstring). Switching args.backend before LMDeploy looks at it keeps
# LMDeploy's own config building untouched.
@when_imported("lmdeploy.cli.serve")
def _on_cli_serve(module: Any) -> None:
    def patch() -> None:
        serve_cli = require_attr(module, "SubCliServe", "lmdeploy.cli.serve")
        wrap_staticmethod(serve_cli, "api_server", "lmdeploy.cli.serve.SubCliServe", ["args"], _wrap_api_server)

    apply("turbomind_fallback.api_server", patch)


# lmdeploy.serve.openai.api_server.serve: the programmatic API server. It
# passes backend and config straight to AsyncEngine, bypassing
# autoget_backend_config. `launch_server` (dp > 1) imports `serve` by name from
# this module after this hook ran, so its processes call the wrapper too (the
# launch_server hook records that binding for a revert).
@when_imported("lmdeploy.serve.openai.api_server")
def _on_api_server(module: Any) -> None:
    def patch() -> None:
        original = hooked(module, "serve", ["model_path", "model_name", "backend", "backend_config"],
                          "lmdeploy.serve.openai.api_server")
        STATE.patcher.setattr(module, "serve", _wrap_serve(original))

    apply("turbomind_fallback.serve", patch)


@when_imported("lmdeploy.serve.openai.launch_server")
def _on_launch_server(module: Any) -> None:
    apply("turbomind_fallback.launch_server", lambda: _rebind_from(module, "serve", "lmdeploy.serve.openai.api_server"))
