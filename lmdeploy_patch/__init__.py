"""LMDeploy 0.18.0 integration of lmdeploy-hostcache.

Installed as a .pth post-import hook: the first `import lmdeploy` in any
interpreter patches LMDeploy in place (config fields, CLI flags, TurboMind
fallback, PyTorch-engine hooks). With the tier off (host_cache_ratio = 0 and
no host_cache_size) every hook falls through to LMDeploy's own code.
Set LMDEPLOY_HOSTCACHE_DISABLE=1 to keep LMDeploy entirely unpatched.
"""
from .compat import EXPECTED_VERSION, STATE


def status() -> dict:
    """Whether the patches are active, and why not if they are not."""
    return {"expected_lmdeploy": EXPECTED_VERSION, "enabled": STATE.enabled, "reason": STATE.reason,
            "applied": list(STATE.applied)}
