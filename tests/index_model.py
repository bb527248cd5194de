"""A plain-Python reference of the prefix index, slow and obviously right.

It mirrors the core's documented policy exactly (lowest-slot-first free list
as a LIFO stack, one clock tick per touch, LRU over ready unpinned leaves,
orphans allowed), so random operation sequences can be checked step by step.
"""
from __future__ import annotations

import numpy as np
import xxhash


def ref_key(parent: int, namespace: int, tokens) -> int:
    data = namespace.to_bytes(8, "little") + np.asarray(tokens, dtype=np.int32).tobytes()
    return xxhash.xxh64(data, seed=parent).intdigest() or 1


class RefIndex:
    def __init__(self, capacity: int, block_tokens: int):
        self.bt = block_tokens
        self.free = list(range(capacity - 1, -1, -1))
        self.live: dict[int, int] = {}  # key -> slot
        self.e: dict[int, dict] = {}    # slot -> entry (live or discarded)
        self.clock = 0
        self.evictions = 0

    def _children(self, key: int) -> int:
        return sum(1 for x in self.e.values() if x["state"] in ("pending", "ready") and x["parent"] == key)

    def _evictable(self, s: int) -> bool:
        x = self.e[s]
        return x["state"] == "ready" and x["pins"] == 0 and self._children(x["key"]) == 0

    def _touch(self, s: int) -> None:
        self.clock += 1
        self.e[s]["stamp"] = self.clock

    def _free(self, s: int) -> None:
        del self.e[s]
        self.free.append(s)

    def evict_one(self) -> bool:
        cands = [(x["stamp"], s) for s, x in self.e.items() if self._evictable(s)]
        if not cands:
            return False
        _, s = min(cands)
        del self.live[self.e[s]["key"]]
        self._free(s)
        self.evictions += 1
        return True

    def insert(self, parent: int, ns: int, toks: tuple):
        key = ref_key(parent, ns, toks)
        if key in self.live:
            s = self.live[key]
            x = self.e[s]
            if (x["parent"], x["ns"], x["toks"]) != (parent, ns, toks):
                return ("collision", key, 0)
            if x["state"] == "pending":
                return ("pending", key, s)
            self._touch(s)
            return ("exists", key, s)
        ps = self.live.get(parent)
        if ps is not None:
            self.e[ps]["pins"] += 1
        room = bool(self.free) or self.evict_one()
        if ps is not None:
            self.e[ps]["pins"] -= 1
        if not room:
            return ("full", key, 0)
        s = self.free.pop()
        self.clock += 1
        self.e[s] = dict(key=key, parent=parent, ns=ns, toks=toks, state="pending", pins=1, stamp=self.clock)
        self.live[key] = s
        return ("created", key, s)

    def match(self, parent: int, ns: int, tokens, pin: bool):
        out = []
        for i in range(len(tokens) // self.bt):
            blk = tuple(int(t) for t in tokens[i * self.bt:(i + 1) * self.bt])
            key = ref_key(parent, ns, blk)
            s = self.live.get(key)
            if s is None:
                break
            x = self.e[s]
            if x["state"] != "ready" or (x["parent"], x["ns"], x["toks"]) != (parent, ns, blk):
                break
            self._touch(s)
            if pin:
                x["pins"] += 1
            out.append((key, s))
            parent = key
        return out

    def commit(self, s: int) -> None:
        x = self.e[s]
        assert x["state"] == "pending"
        x["state"] = "ready"
        x["pins"] -= 1

    def discard(self, s: int) -> None:
        x = self.e[s]
        if x["state"] not in ("pending", "ready"):
            return
        del self.live[x["key"]]
        if x["pins"] == 0:
            self._free(s)
        else:
            x["state"] = "discarded"

    def pin(self, s: int) -> None:
        self.e[s]["pins"] += 1

    def unpin(self, s: int) -> None:
        x = self.e[s]
        x["pins"] -= 1
        if x["state"] == "discarded" and x["pins"] == 0:
            self._free(s)
