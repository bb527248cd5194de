"""Whether this machine can run GPU tests: one answer for tests/gpu and tests/engine."""
from __future__ import annotations

from typing import Optional


def gpu_problem() -> Optional[str]:
    """None when this build has CUDA and torch sees a device; else why not."""
    from lmdeploy_hostcache import build_info

    info = build_info()
    if not info["gpu_usable"]:
        return f"needs a usable GPU: {info['reason']}"
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None
