"""lmdeploy.serve.core.async_engine: a salted request is refused where the
salt cannot keep it apart (cache_salt.py): by a TurboMind engine with prefix
caching, whose compiled prefix cache keys blocks by tokens alone, and by a
PyTorch engine with an external KV connector (kv_transfer_config), whose
store keys blocks by tokens and adapter alone.

Why safe: AsyncEngine._determine_gen_config is where every request's
generation config is settled before it reaches either engine; unsalted
requests and engines that honour salts pass through unchanged. The
ValueError reaches an API client as LMDeploy's invalid-request error."""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..hook import wrap

TURBOMIND_SALT_ERROR = ("cache_salt needs the PyTorch engine (--backend pytorch): TurboMind's prefix cache "
                        "shares blocks across salts. Send the request without cache_salt, or serve with the "
                        "PyTorch engine")
CONNECTOR_SALT_ERROR = ("cache_salt cannot be kept apart by the external KV connector (kv_transfer_config), whose "
                        "store keys blocks by tokens and adapter only. Send the request without cache_salt, or "
                        "serve without the connector")


def salt_refusal(engine: Any) -> Optional[str]:
    """Why `engine` (an AsyncEngine) cannot honour a cache salt, or None."""
    config = getattr(engine, "backend_config", None)
    if getattr(engine, "backend", None) == "turbomind":
        return TURBOMIND_SALT_ERROR if getattr(config, "enable_prefix_caching", False) else None
    transfer = getattr(config, "kv_transfer_config", None)
    return CONNECTOR_SALT_ERROR if getattr(transfer, "kv_connector", None) else None


@wrap("lmdeploy.serve.core.async_engine", "AsyncEngine._determine_gen_config", ["self", "input_ids", "gen_config"])
def _determine_gen_config(original: Callable, self: Any, input_ids: Any, gen_config: Any = None) -> Any:
    if getattr(gen_config, "cache_salt", None) is not None:
        refusal = salt_refusal(self)
        if refusal:
            raise ValueError(refusal)
    return original(self, input_ids, gen_config)
