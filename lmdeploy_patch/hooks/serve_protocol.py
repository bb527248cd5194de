"""lmdeploy.serve.openai.protocol: `cache_salt` on the chat and completion
requests (cache_salt.py).

Why safe: the field is added to the pydantic models as the module finishes
importing, before the endpoint modules import them and FastAPI builds its
request validators from them; the models are rebuilt once. A value that is
not a string of 1 to cache_salt.SALT_MAX_CHARS characters fails validation,
which LMDeploy's server answers with a 400 naming the field. The endpoints
build their GenerationConfig from the request's fields that GenerationConfig
has, which now include cache_salt (hooks/messages.py)."""
from __future__ import annotations

from typing import Any

from ..compat import IncompatibleLMDeploy, STATE, apply, require_attr
from ..import_hooks import when_imported

REQUESTS = ("ChatCompletionRequest", "CompletionRequest")


@when_imported("lmdeploy.serve.openai.protocol")
def _on_import(module: Any) -> None:
    def patch() -> None:
        from typing import Optional

        from pydantic.fields import FieldInfo

        from ..cache_salt import SALT_MAX_CHARS

        for name in REQUESTS:
            cls = require_attr(module, name, "lmdeploy.serve.openai.protocol")
            fields = require_attr(cls, "model_fields", f"lmdeploy.serve.openai.protocol.{name}")
            if "cache_salt" in fields:
                raise IncompatibleLMDeploy(f"lmdeploy.serve.openai.protocol.{name} already has cache_salt")
            info = FieldInfo(annotation=Optional[str], default=None, min_length=1, max_length=SALT_MAX_CHARS,
                             description="Requests share cached KV blocks only with requests of the same salt.")
            STATE.patcher.call_on_revert(lambda c=cls: c.model_rebuild(force=True))  # runs after the two below
            STATE.patcher.setitem(cls.__annotations__, "cache_salt", Optional[str])
            STATE.patcher.setitem(fields, "cache_salt", info)
            cls.model_rebuild(force=True)

    apply("lmdeploy.serve.openai.protocol:cache_salt", patch)
