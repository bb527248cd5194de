"""The prefix index against a reference model under long random operation
sequences, plus the contracts one at a time."""
from __future__ import annotations

import numpy as np
import pytest

from index_model import RefIndex, ref_key
from lmdeploy_hostcache import ROOT_KEY, _core

BT = 4  # small blocks make shared prefixes and collisions of paths frequent


def docs(rng: np.random.Generator, n: int = 12) -> list[np.ndarray]:
    """Token sequences sharing prefixes, from a tiny alphabet."""
    base = [rng.integers(0, 3, size=BT * 8, dtype=np.int32) for _ in range(3)]
    out = []
    for _ in range(n):
        b = base[rng.integers(len(base))].copy()
        cut = int(rng.integers(0, len(b)))
        b[cut:] = rng.integers(0, 3, size=len(b) - cut)
        out.append(b)
    return out


def compare_state(core: _core.PrefixIndex, ref: RefIndex) -> None:
    core.check_invariants()
    assert core.used == len(ref.e) and core.evictions == ref.evictions
    for key, s in ref.live.items():
        assert core.find(key) == s
    for s, x in ref.e.items():
        assert core.pins(s) == x["pins"], f"slot {s}"
        assert core.is_ready(s) == (x["state"] == "ready")


@pytest.mark.parametrize("seed", range(8))
def test_random_operations_match_reference(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(3, 24))
    core, ref = _core.PrefixIndex(capacity, BT), RefIndex(capacity, BT)
    corpus = docs(rng)
    hits = 0
    for step in range(1500):
        op = rng.choice(["insert_chain", "insert_odd", "commit", "match", "pin", "unpin", "discard", "evict"],
                        p=[0.3, 0.05, 0.2, 0.2, 0.07, 0.1, 0.04, 0.04])
        pending = [s for s, x in ref.e.items() if x["state"] == "pending"]
        live = [s for s, x in ref.e.items() if x["state"] in ("pending", "ready")]
        pinned = [s for s, x in ref.e.items() if x["pins"] > 0 and not (x["state"] == "pending" and x["pins"] == 1)]
        if op == "insert_chain":  # block i of a document under the key of block i-1
            doc = corpus[rng.integers(len(corpus))]
            ns = int(rng.integers(0, 2))
            i = int(rng.integers(0, len(doc) // BT))
            parent = ROOT_KEY
            for j in range(i):
                parent = ref_key(parent, ns, doc[j * BT:(j + 1) * BT])
            toks = tuple(int(t) for t in doc[i * BT:(i + 1) * BT])
            assert tuple(core.insert(parent, ns, np.array(toks, np.int32))) == ref.insert(parent, ns, toks)
        elif op == "insert_odd":  # a parent that is absent: an orphan
            parent = int(rng.integers(1, 2**63))
            toks = tuple(int(t) for t in rng.integers(0, 3, size=BT))
            assert tuple(core.insert(parent, 0, np.array(toks, np.int32))) == ref.insert(parent, 0, toks)
        elif op == "commit" and pending:
            s = int(rng.choice(pending))
            core.commit(s)
            ref.commit(s)
        elif op == "match":
            doc = corpus[rng.integers(len(corpus))]
            ns, pin = int(rng.integers(0, 2)), bool(rng.random() < 0.3)
            got = [tuple(x) for x in core.match(ROOT_KEY, ns, doc, pin)]
            assert got == ref.match(ROOT_KEY, ns, doc, pin)
            hits += len(got)
        elif op == "pin" and live:
            s = int(rng.choice(live))
            core.pin(s)
            ref.pin(s)
        elif op == "unpin" and pinned:
            s = int(rng.choice(pinned))
            core.unpin(s)
            ref.unpin(s)
        elif op == "discard" and live:
            s = int(rng.choice(live))
            core.discard(s)
            ref.discard(s)
        elif op == "evict":
            assert core.evict_one() == ref.evict_one()
        if step % 10 == 0:
            compare_state(core, ref)
    compare_state(core, ref)
    assert hits > 0 and ref.evictions > 0, "the sequence never exercised matching or eviction"


def block(*tokens: int) -> np.ndarray:
    return np.array(tokens, dtype=np.int32)


def insert_ready(ix: _core.PrefixIndex, parent: int, ns: int, toks: np.ndarray) -> tuple[int, int]:
    status, key, slot = ix.insert(parent, ns, toks)
    assert status == "created"
    ix.commit(slot)
    return key, slot


def test_insert_existing_key_is_idempotent():
    ix = _core.PrefixIndex(4, 2)
    k, s = insert_ready(ix, ROOT_KEY, 0, block(1, 2))
    assert tuple(ix.insert(ROOT_KEY, 0, block(1, 2))) == ("exists", k, s)
    assert ix.used == 1


def test_pending_entries_are_not_matchable():
    ix = _core.PrefixIndex(4, 2)
    status, key, slot = ix.insert(ROOT_KEY, 0, block(1, 2))
    assert ix.match(ROOT_KEY, 0, block(1, 2)) == []
    assert ix.insert(ROOT_KEY, 0, block(1, 2))[0] == "pending"
    ix.commit(slot)
    assert ix.match(ROOT_KEY, 0, block(1, 2)) == [(key, slot)]


def test_match_checks_parent_namespace_and_tokens():
    ix = _core.PrefixIndex(8, 2)
    k1, _ = insert_ready(ix, ROOT_KEY, 0, block(1, 2))
    insert_ready(ix, k1, 0, block(3, 4))
    assert len(ix.match(ROOT_KEY, 0, block(1, 2, 3, 4))) == 2
    assert len(ix.match(ROOT_KEY, 0, block(1, 2, 3, 5))) == 1   # tokens differ
    assert len(ix.match(ROOT_KEY, 1, block(1, 2, 3, 4))) == 0   # namespace differs
    assert len(ix.match(k1, 0, block(1, 2))) == 0               # other parent
    assert len(ix.match(k1, 0, block(3, 4))) == 1               # continue from a parent
    assert ix.match_count(ROOT_KEY, 0, block(1, 2, 3)) == 1     # partial blocks are not matched


def test_only_leaves_are_evicted_and_pinned_never():
    ix = _core.PrefixIndex(3, 1)
    a, sa = insert_ready(ix, ROOT_KEY, 0, block(1))
    b, sb = insert_ready(ix, a, 0, block(2))
    c, sc = insert_ready(ix, ROOT_KEY, 0, block(9))
    ix.match(ROOT_KEY, 0, block(9))  # c is the most recent
    ix.pin(sb)
    # a is the oldest but an inner node, b is pinned: c goes
    assert ix.evict_one() and ix.find(c) == -1
    assert not ix.evict_one()  # a inner, b pinned
    ix.unpin(sb)
    assert ix.evict_one() and ix.find(b) == -1
    assert ix.evict_one() and ix.find(a) == -1
    ix.check_invariants()


def test_orphans_count_as_children_of_a_late_parent():
    ix = _core.PrefixIndex(4, 1)
    parent_key = ref_key(ROOT_KEY, 0, [1])
    child, _ = insert_ready(ix, parent_key, 0, block(2))   # parent only on the GPU so far
    p, sp = insert_ready(ix, ROOT_KEY, 0, block(1))         # write-back: parent evicted later
    assert p == parent_key
    assert ix.evict_one() and ix.find(child) == -1          # the parent is an inner node
    assert ix.evict_one() and ix.find(p) == -1
    ix.check_invariants()


def test_discard_while_pinned_frees_on_last_unpin():
    ix = _core.PrefixIndex(2, 1)
    k, s = insert_ready(ix, ROOT_KEY, 0, block(5))
    ix.pin(s)
    ix.discard(s)
    assert ix.find(k) == -1 and ix.used == 1
    ix.unpin(s)
    assert ix.used == 0
    ix.check_invariants()


def test_chain_key_is_xxh64_of_namespace_and_tokens():
    rng = np.random.default_rng(0)
    for n in [0, 1, 3, 4, 7, 8, 31, 32, 33, 64, 100, 513]:
        toks = rng.integers(-2**31, 2**31 - 1, size=n, dtype=np.int64).astype(np.int32)
        parent, ns = int(rng.integers(0, 2**63)), int(rng.integers(0, 2**63))
        assert _core.chain_key(parent, ns, toks) == ref_key(parent, ns, toks)
