"""Per-request cache namespaces: `cache_salt`.

A request with a salt (the OpenAI field `cache_salt` on /v1/chat/completions
and /v1/completions, or `GenerationConfig(cache_salt=...)`) shares cached
KV blocks only with requests of the same salt: in LMDeploy's GPU prefix
trie and in the host tier alike. Requests without one share with each
other as before. So one tenant can neither reuse another's cached prefix
nor learn from its own time to first token whether another tenant sent a
prompt.

How: the salt's digest (`SaltIdentity`) travels on the request's
SamplingParam (set where LMDeploy builds it from the generation config,
hooks/pytorch_messages.py) and is appended to every block's identity, the
tuple LMDeploy's trie already hashes and compares exactly for multimodal
content (SchedulerSequence.get_prefix_cache_extra_identity). Blocks of
different salts are different blocks to the trie, to its exact check after
a hash hit, and to the host tier, which keys them under a namespace of the
adapter and the salt (`namespace`). The salt itself stays where the
request was parsed; only its digest reaches the scheduler.
"""
from __future__ import annotations

import hashlib
from typing import Any, NamedTuple, Optional


class SaltIdentity(NamedTuple):
    """A block-identity entry like LMDeploy's multimodal ones: it overlaps
    every token range (start, end), so range filters keep it."""

    start: int
    end: int
    digest: bytes


_EVERYWHERE = (0, 1 << 62)


def identity(salt: Optional[str]) -> Optional[SaltIdentity]:
    if salt is None:
        return None
    digest = hashlib.blake2b(salt.encode("utf-8"), digest_size=16, person=b"lmdeploy-salt").digest()
    return SaltIdentity(*_EVERYWHERE, digest)


def of_sequence(seq: Any) -> Optional[SaltIdentity]:
    return getattr(getattr(seq, "sampling_param", None), "cache_salt_identity", None)


def split(extra_identity: tuple) -> tuple[Optional[SaltIdentity], tuple]:
    """(the salt entry, the other entries) of a block identity."""
    salt = next((x for x in extra_identity if isinstance(x, SaltIdentity)), None)
    if salt is None:
        return None, extra_identity
    return salt, tuple(x for x in extra_identity if not isinstance(x, SaltIdentity))


def namespace(adapter_name: Optional[str], salt: Optional[SaltIdentity]) -> int:
    """The host tier's key namespace: blocks of different adapters or salts
    never share host entries; 0 for the base model without a salt."""
    if not adapter_name and salt is None:
        return 0
    h = hashlib.blake2b(digest_size=8, person=b"lmdeploy-hc-ns")
    h.update((adapter_name or "").encode())
    if salt is not None:
        h.update(b"\0salt\0" + salt.digest)
    return int.from_bytes(h.digest(), "little") or 1
