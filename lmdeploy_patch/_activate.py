"""Imported at interpreter start by lmdeploy_hostcache.pth. Registers the
post-import hooks and returns; it imports neither LMDeploy nor torch, and a
failure here must never break the interpreter."""
try:
    from lmdeploy_patch import registry as _registry

    _registry.install()
except Exception as _e:  # noqa: BLE001 - a .pth import must not fail the interpreter
    import sys

    print(f"lmdeploy-hostcache: post-import hooks not installed: {_e}", file=sys.stderr)
