"""The keys of blocks in a Mooncake Store shared by many engines
(docs/store_tier.md explains them once; store_tier.py uses them).

A block's object key names everything its bytes depend on, so that two
engines share an object only when either could have computed it:

  lmdeploy-hostcache/v<LAYOUT_VERSION>/<engine namespace>/rank<rank>-<slot layout>/<chain digest>

- the engine namespace (`engine_namespace`) covers the model (its name and
  a digest of its config), its adapters (names, and what their directories hold),
  the KV cache's dtype and quant policy, the block size, the tensor-parallel
  size and the rank's slot bytes: anything that changes a block's layout or
  its values;
- `rank<rank>-<slot layout>`: each tensor-parallel rank stores its own
  share of a block, with a digest of how its slot lays out each KV pool
  (`slot_layout`: layers, bytes per kernel block, dtype, kernel blocks per block);
- the chain digest (`block_digest`) is a 128-bit BLAKE2b chained from the
  root of the prompt over each block's token ids and its request namespace
  (adapter and cache salt, cache_salt.namespace): a digest names the whole
  prefix up to the end of its block, never a block alone.

Nothing is compared after a key matches (the store holds bytes only), so a
key must not collide: the host index's 64-bit chain keys check tokens on a
hit, these are 128 bits over the same chain and are never reused across
namespaces. An engine that differs in any part of the namespace computes
other keys: a mismatch can only ever be a miss.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

# Bumped when what a slot holds changes shape (the order of layers, K/V and
# scales in a slot: lmdeploy_hostcache regions): old objects become misses.
LAYOUT_VERSION = 1
DIGEST_BYTES = 16
_PERSON = b"lmdhc-block"

# Config entries that name where a model was loaded from or what wrote it, not what it computes.
_NOT_IDENTITY = {"_name_or_path", "transformers_version", "_commit_hash", "name_or_path"}


def model_identity(hf_config: Any) -> tuple[str, str]:
    """(the model's name: its directory's or hub id's last part, a digest of its config)."""
    raw = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(vars(hf_config))
    name = str(raw.get("_name_or_path") or getattr(hf_config, "name_or_path", "") or raw.get("model_type", ""))
    name = name.rstrip("/").rsplit("/", 1)[-1]
    kept = {k: v for k, v in raw.items() if k not in _NOT_IDENTITY}
    text = json.dumps(kept, sort_keys=True, default=str)
    return name, hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def adapters_digest(adapters: dict) -> str:
    """An engine's adapters: each name with what its directory holds (its
    adapter_config.json and its files' names and sizes), or, for a hub id,
    the id."""
    h = hashlib.blake2b(digest_size=6)
    for name, path in sorted((str(k), str(v)) for k, v in adapters.items()):
        h.update(json.dumps([name, _adapter_identity(path)]).encode())
    return h.hexdigest()


def _adapter_identity(path: str) -> Any:
    if not os.path.isdir(path):
        return path
    files = sorted((f, os.path.getsize(os.path.join(path, f))) for f in os.listdir(path)
                   if os.path.isfile(os.path.join(path, f)))
    config = os.path.join(path, "adapter_config.json")
    text = open(config, "rb").read() if os.path.isfile(config) else b""
    return [files, hashlib.blake2b(text, digest_size=8).hexdigest()]


def engine_namespace(model_name: str, config_digest: str, kv_dtype: str, quant_policy: int, block_size: int,
                     tp_size: int, slot_bytes: int) -> str:
    """What every key of an engine's ranks shares (module docstring), as hex."""
    text = json.dumps({"model": model_name, "config": config_digest, "kv_dtype": str(kv_dtype),
                       "quant_policy": int(quant_policy), "block_size": int(block_size), "tp": int(tp_size),
                       "slot_bytes": int(slot_bytes), "layout": LAYOUT_VERSION}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def root_digest(namespace: str) -> bytes:
    """The digest a prompt's first block chains from."""
    return hashlib.blake2b(namespace.encode(), digest_size=DIGEST_BYTES, person=_PERSON).digest()


def block_digest(parent: bytes, ns: int, tokens: np.ndarray) -> bytes:
    """The digest of the prefix ending with this block: its parent's, the
    request namespace (adapter, salt) and the block's token ids."""
    h = hashlib.blake2b(parent, digest_size=DIGEST_BYTES, person=_PERSON)
    h.update(int(ns).to_bytes(8, "little"))
    h.update(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    return h.digest()


def chain(parent: bytes, ns: int, tokens: np.ndarray, block_size: int) -> list[bytes]:
    """The digests of the whole blocks of `tokens` after `parent`."""
    out: list[bytes] = []
    for i in range(len(tokens) // block_size):
        parent = block_digest(parent, ns, tokens[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


def slot_layout(allocation: Any, blocks_per_logical: int) -> str:
    """A digest of what a rank's slot holds: each KV pool's layers, bytes per
    kernel block, dtype and block axis; each typed view LMDeploy packs into
    them (K, V, scales: shape within a block, dtype, offset); kernel blocks
    per block; LMDeploy's version. Not the block count, which differs with
    GPU memory."""
    import lmdeploy

    pools = [(int(p.tensor.shape[0]), int(p.tensor.shape[2]), str(p.tensor.dtype), int(p.entry_axis))
             for p in allocation.pools]
    views = [(list(v.shape[2:]), str(v.dtype), int(v.storage_offset())) for v in getattr(allocation, "tensor_views", ())]
    text = json.dumps({"pools": pools, "views": views, "kernel_blocks_per_block": int(blocks_per_logical),
                       "lmdeploy": lmdeploy.__version__})
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def key_prefix(namespace: str, rank: int, layout: str = "") -> str:
    """A rank's object keys are this plus a chain digest in hex."""
    return f"lmdeploy-hostcache/v{LAYOUT_VERSION}/{namespace}/rank{rank}{'-' + layout if layout else ''}/"
