"""The Mooncake Store behind the host pool (lmdeploy_patch/store_tier.py)
with LMDeploy 0.18.0's real engine: a real master, metadata server and
storage node in a private network and PID namespace, and one engine
process after another (tests/store/engines.py says which). The GPU cache of
each engine starts empty, and so does its host pool: what one engine finds
of another's work it found in the store.

The store must never cost a token: every engine with the reference's
settings gives the reference's greedy tokens (a never-evicting GPU cache),
hits or failures. Engines whose settings differ must find nothing of the
others' (their keys differ: docs/store_tier.md), while an engine with the
same settings finds all: the control that the misses come from the keys.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, engine_env, get, in_private_netns

sys.path.insert(0, str(REPO / "tests" / "store"))
from cluster import store_problem  # noqa: E402


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict:
    why, fail = store_problem()  # (a GPU machine without the mooncake package skips)
    if why:
        pytest.fail(why) if fail else pytest.skip(why)
    out = tmp_path_factory.mktemp("store-engines") / "engines.json"
    cmd = ["unshare", "--pid", "--fork", "--kill-child",
           *in_private_netns([sys.executable, str(REPO / "tests" / "store" / "engines.py"), "--model", tiny_model_dir,
                              "--out", str(out)])[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=engine_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def _differ(a: dict, b: dict) -> list:
    assert [(t["session"], t["turn"]) for t in a["turns"]] == [(t["session"], t["turn"]) for t in b["turns"]]
    return [(x["session"], x["turn"]) for x, y in zip(a["turns"], b["turns"]) if x["tokens"] != y["tokens"]]


def _store(run: dict) -> dict:
    return {k[len("host_store_"):]: v for k, v in run["metrics"]["host_cache"].items() if k.startswith("host_store_")}


def _prefix(run: dict, ref: dict) -> dict:
    """ref cut to the turns run ran (the same plan, fewer turns)."""
    n = len(run["turns"])
    return {**ref, "turns": ref["turns"][:n]}


def test_an_engine_puts_what_it_computed(runs):
    a = get(runs, "a")
    assert not _differ(a, _prefix(a, get(runs, "ref")))
    store = _store(a)
    assert store["blocks_put"] > 0 and store["bytes_written"] > 0 and store["hit_blocks"] == 0, store
    assert a["balance_problems"] == [], a["balance_problems"]


def test_another_engine_process_restarted_from_scratch_restores_it(runs):
    """(a) and (b): engine `b` is a new process with empty GPU and host
    caches, after `a` exited; its first request, and every prefix of a
    conversation `a` served, comes from the store, and its tokens are the
    never-evicting reference's, through the turn that continues them."""
    b, a, ref = get(runs, "b"), get(runs, "a"), get(runs, "ref")
    assert not _differ(b, ref), _differ(b, ref)
    first = b["turns"][0]
    assert first["cached_tokens"] > 0, first  # nothing but the store could have served it
    store = _store(b)
    assert store["hit_blocks"] >= _store(a)["blocks_put"], (store, _store(a))  # all of a's blocks
    assert store["hit_tokens"] == store["hit_blocks"] * 64 and store["bytes_read"] > 0, store
    assert store["failures_timeout"] == store["failures_transfer"] == store["failures_size"] == 0, store
    assert b["balance_problems"] == [], b["balance_problems"]


@pytest.mark.parametrize("name", ["quant", "block", "config"])  # quant_policy 4; 32-token blocks; a config value
def test_engines_with_other_settings_find_nothing(runs, name):
    """`config` computes what `a` did, token for token, from the same weights
    under the same name: only its config digest keeps it from `a`'s objects."""
    run = get(runs, name)
    if name == "config":
        assert not _differ(run, _prefix(run, get(runs, "ref")))
    store = _store(run)
    assert store["lookups"] > 0 and store["hit_blocks"] == 0, store
    assert run["turns"][0]["cached_tokens"] == 0, run["turns"][0]
    assert run["balance_problems"] == [], run["balance_problems"]


def test_a_storage_node_killed_mid_run_costs_recomputes_not_tokens(runs):
    """(d): the node holding every object dies after the first request."""
    run, ref = get(runs, "node"), get(runs, "ref")
    assert runs["node_killed"] is True
    assert not _differ(run, ref), _differ(run, ref)
    store = _store(run)
    assert store["hit_blocks"] > 0, store  # before the kill
    assert store["failures_transfer"] > 0 and store["skipped_down"] > 0, store
    assert run["balance_problems"] == [], run["balance_problems"]


def test_a_stalled_node_costs_its_budget_then_serves_again(runs):
    """A slow store: fetches from a stopped node outlast the budget (misses,
    counted as timeouts, their slots held until the fetch ends); once the
    node runs again, hits resume: more blocks come from the store than the
    first request's."""
    run, ref = get(runs, "stalled"), get(runs, "ref")
    assert not _differ(run, ref), _differ(run, ref)
    store = _store(run)
    assert store["failures_timeout"] > 0, store
    assert store["hit_tokens"] > run["turns"][0]["cached_tokens"] > 0, store
    assert store["up"] == 1, store
    assert run["balance_problems"] == [], run["balance_problems"]  # the late fetches gave their slots back


def test_a_hung_store_neither_stops_serving_nor_holds_up_the_exit(runs):
    """The master stopped for good after the first request: every call from
    then on hangs. The engine serves the reference's tokens, and its
    process exits within the bound on closing the store (rank_tier.STORE_CLOSE_S)."""
    from lmdeploy_patch.rank_tier import STORE_CLOSE_S

    run, ref = get(runs, "hung"), get(runs, "ref")
    assert not _differ(run, ref), _differ(run, ref)
    store = _store(run)
    assert store["failures_timeout"] > 0 and store["up"] == 0, store
    assert run["exit_s"] < STORE_CLOSE_S + 5, run["exit_s"]


def test_an_unreachable_store_leaves_the_host_tier_serving(runs):
    run, ref = get(runs, "unreachable"), get(runs, "ref")
    assert not _differ(run, ref), _differ(run, ref)
    said = [line for line in run["hostcache_log"] if "host_cache_store" in line]
    assert len(said) == 1 and "cannot be reached" in said[0] and "serving with the host tier alone" in said[0], said
    store = _store(run)
    assert store["lookups"] == 0 and store["up"] == 0, store
    assert run["metrics"]["host_cache"]["host_hit_tokens"] > 0 and run["balance_problems"] == []  # the host tier serves
