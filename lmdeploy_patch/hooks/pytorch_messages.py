"""lmdeploy.pytorch.messages: a request's cache salt becomes part of every
block's identity (cache_salt.py).

Why safe: SamplingParam.from_gen_config is where the PyTorch engine turns a
request's GenerationConfig into what its scheduler keeps (EngineInstance
calls it in the engine process); the salt's digest is set on the result, an
instance attribute that pickles with it. get_prefix_cache_extra_identity is
what BlockTrie hashes and compares exactly, with the token ids, for every
block it matches or attaches; a salted sequence's entries gain its
SaltIdentity, so its blocks are other blocks to the trie. Without a salt
both calls are LMDeploy's, unchanged."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap

MESSAGES = "lmdeploy.pytorch.messages"


@wrap(MESSAGES, "SamplingParam.from_gen_config", ["cls", "gen_config"], kind="classmethod")
def from_gen_config(original: Callable, cls: Any, gen_config: Any) -> Any:
    param = original(cls, gen_config)
    salt = getattr(gen_config, "cache_salt", None)
    if salt is not None:
        from ..cache_salt import identity

        param.cache_salt_identity = identity(salt)
    return param


@wrap(MESSAGES, "SchedulerSequence.get_prefix_cache_extra_identity", ["self", "start", "end"])
def get_prefix_cache_extra_identity(original: Callable, self: Any, start: int, end: int) -> Any:
    extras = original(self, start, end)
    # cache_salt.of_sequence, inlined: this runs for every block the trie looks at
    salt = getattr(self.sampling_param, "cache_salt_identity", None)
    return extras if salt is None else (*extras, salt)
