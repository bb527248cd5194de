"""lmdeploy.pipeline bound archs.autoget_backend_config by name: that binding
points at the hooked function (hooks/archs.py), through the patcher."""
from __future__ import annotations

from ..hook import rebind

rebind("lmdeploy.pipeline", "autoget_backend_config", "lmdeploy.archs")
