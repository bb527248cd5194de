"""lmdeploy.serve.openai.launch_server bound api_server.serve by name: that
binding points at the hooked function (hooks/serve_api_server.py)."""
from __future__ import annotations

from ..hook import rebind

rebind("lmdeploy.serve.openai.launch_server", "serve", "lmdeploy.serve.openai.api_server")
