"""lmdeploy.serve.openai.api_server.serve: the programmatic API server. It
passes backend and config straight to AsyncEngine, bypassing
autoget_backend_config, so a TurboMind request for the tier is converted at
the call (turbomind_fallback.py). `launch_server` (dp > 1) imports `serve`
by name from this module after this hook ran, so its processes call the
wrapper too (hooks/serve_launch_server.py records that binding)."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap
from ..settings import host_cache_requested


@wrap("lmdeploy.serve.openai.api_server", "serve", ["model_path", "model_name", "backend", "backend_config"])
def serve(original: Callable, *args: Any, **kwargs: Any) -> Any:
    import inspect

    from ..turbomind_fallback import is_turbomind_config, turbomind_to_pytorch, warn_fallback

    signature = inspect.signature(original)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return original(*args, **kwargs)  # let LMDeploy report the bad call
    config = bound.arguments.get("backend_config")
    backend = bound.arguments.get("backend", signature.parameters["backend"].default)
    if backend == "pytorch" or not host_cache_requested(config):
        return original(*args, **kwargs)
    warn_fallback(f"serve(backend={backend!r}) with {type(config).__name__}")
    bound.arguments["backend"] = "pytorch"
    if is_turbomind_config(config):
        bound.arguments["backend_config"] = turbomind_to_pytorch(config)
    return original(*bound.args, **bound.kwargs)
