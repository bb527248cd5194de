"""lmdeploy.archs.autoget_backend_config: the pipeline's backend choice. A
TurboMind config asking for the tier is served by the PyTorch engine
(turbomind_fallback.py). `pipeline.py` binds the function by name
(`from .archs import autoget_backend_config`) while it imports archs, right
after this hook ran; hooks/pipeline.py records that binding too."""
from __future__ import annotations

import sys
from typing import Any, Callable

from ..compat import apply, require_attr
from ..hook import install, original_of, rebind_by_name
from ..import_hooks import initialising, when_imported
from ..settings import host_cache_requested


def autoget_backend_config(original: Callable, model_path: str, backend_config: Any = None,
                           trust_remote_code: bool = False) -> Any:
    from ..turbomind_fallback import is_turbomind_config, turbomind_to_pytorch, warn_fallback

    if is_turbomind_config(backend_config) and host_cache_requested(backend_config):
        warn_fallback("TurbomindEngineConfig")
        return "pytorch", turbomind_to_pytorch(backend_config)
    return original(model_path, backend_config, trust_remote_code=trust_remote_code)


@when_imported("lmdeploy.archs")
def _on_import(module: Any) -> None:
    def patch() -> None:
        require_attr(module, "autoget_backend", "lmdeploy.archs")
        # turbomind_to_pytorch relies on these fields of both configs.
        require_attr(require_attr(module, "TurbomindEngineConfig", "lmdeploy.archs"), "cache_block_seq_len",
                     "lmdeploy.messages.TurbomindEngineConfig")
        require_attr(require_attr(module, "PytorchEngineConfig", "lmdeploy.archs"), "block_size",
                     "lmdeploy.messages.PytorchEngineConfig")
        original = original_of(module, "autoget_backend_config", "function",
                               ["model_path", "backend_config", "trust_remote_code"], "lmdeploy.archs")
        replacement = install(module, "autoget_backend_config", "function", original, autoget_backend_config)
        pipeline = sys.modules.get("lmdeploy.pipeline")
        if pipeline is not None and not initialising(pipeline):
            rebind_by_name(pipeline, "autoget_backend_config", replacement)

    apply("lmdeploy.archs:autoget_backend_config", patch)
