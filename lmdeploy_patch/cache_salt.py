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
content (SchedulerSequence.get_prefix_cache_extra_identity), and to the
exact identity SSM state checkpoints are verified against
(block_trie.checkpoint.make_request_multimodal_identity). Blocks of
different salts are different blocks to the trie, to its exact check after
a hash hit, and to the host tier, which keys them under a namespace of the
adapter and the salt (`namespace`). The salt itself stays where the
request was parsed; only its digest reaches the scheduler.

Where a salt cannot keep requests apart it is refused (hooks/async_engine.py):
TurboMind with prefix caching, an external KV connector. LMDeploy's
/generate and /v1/responses endpoints do not take the field.
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

# A salt names a tenant: a short string. The bound keeps a request from
# making the server hold and hash megabytes for it.
SALT_MAX_CHARS = 1024
SALT_RANGE = f"None, or a string of 1 to {SALT_MAX_CHARS} characters"


def check_salt(value: object, name: str = "cache_salt") -> Optional[str]:
    """The salt itself is never echoed: it is a tenant's secret."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be {SALT_RANGE}; got {type(value).__name__}")
    if not 0 < len(value) <= SALT_MAX_CHARS:
        raise ValueError(f"{name} must be {SALT_RANGE}; got {len(value)} characters")
    return value


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
