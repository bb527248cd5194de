"""lmdeploy.pytorch.paging.block_trie.checkpoint: SSM state checkpoints
check a request's exact identity too, so a salted request's identity
includes its salt (cache_salt.py).

Why safe: make_request_multimodal_identity is the exact identity a
checkpoint is published with and verified against (StateCheckpointIndex);
checkpoint.py looks it up as a module global at call time, and trie.py,
which bound it by name, is rebound to the hooked function. Unsalted
requests get LMDeploy's identity unchanged."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import rebind, wrap

CHECKPOINT = "lmdeploy.pytorch.paging.block_trie.checkpoint"


@wrap(CHECKPOINT, "make_request_multimodal_identity", ["seq", "step"])
def make_request_multimodal_identity(original: Callable, seq: Any, step: int) -> Any:
    from ..cache_salt import of_sequence

    identity = original(seq, step)
    salt = of_sequence(seq)
    return identity if salt is None else (*identity, salt)


rebind("lmdeploy.pytorch.paging.block_trie.trie", "make_request_multimodal_identity", CHECKPOINT)
