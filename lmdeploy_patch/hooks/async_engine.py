"""lmdeploy.serve.core.async_engine: a salted request to a TurboMind engine
with prefix caching is refused (cache_salt.py).

Why: TurboMind's compiled prefix cache keys blocks by tokens alone, so it
would serve one salt's blocks to another; refusing is the only honest
answer. AsyncEngine._determine_gen_config is where every request's
generation config is settled before it reaches either engine; the PyTorch
engine and unsalted requests pass through unchanged."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap

TURBOMIND_SALT_ERROR = ("cache_salt needs the PyTorch engine (--backend pytorch): TurboMind's prefix cache "
                        "shares blocks across salts. Send the request without cache_salt, or serve with the "
                        "PyTorch engine")


@wrap("lmdeploy.serve.core.async_engine", "AsyncEngine._determine_gen_config", ["self", "input_ids", "gen_config"])
def _determine_gen_config(original: Callable, self: Any, input_ids: Any, gen_config: Any = None) -> Any:
    if (getattr(gen_config, "cache_salt", None) is not None and getattr(self, "backend", None) == "turbomind"
            and getattr(getattr(self, "backend_config", None), "enable_prefix_caching", False)):
        raise ValueError(TURBOMIND_SALT_ERROR)
    return original(self, input_ids, gen_config)
