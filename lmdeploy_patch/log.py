"""The integration's one logger, and lines said once per process."""
from __future__ import annotations

import logging

logger = logging.getLogger("lmdeploy_hostcache")
_said: set[str] = set()


def log_once(message: str) -> None:
    """A warning prefixed `lmdeploy-hostcache:`, the first time this text is said."""
    if message not in _said:
        _said.add(message)
        logger.warning("lmdeploy-hostcache: %s", message)
