"""`lmdeploy serve api_server MODEL --backend pytorch --host-cache` driven by
the `openai` client with streaming (server_chat.py, inside a private network
namespace), against a tier-off server whose GPU cache never evicts; and one
short `lmdeploy chat` session with the host-cache flags."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import MODE, REPO, EngineRuns, engine_env, get, netns_problem, netns_required

BLOCK_TOKENS = 64
# Tiny model (tiny_model.py): 4 layers x (K, V) x 2 KV heads x head dim 64 x 64 tokens x 2 bytes (bf16).
BLOCK_BYTES = 4 * 2 * 2 * 64 * BLOCK_TOKENS * 2
DEFAULT_RATIO, ON_GPU_BLOCKS = 4, 24
CLIENTS, CLIENT_TURNS = 32, 3


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory, run_notes) -> dict:
    problem = netns_problem()
    if problem:
        netns_required(problem)
        pytest.skip(f"the API-server test runs in a private network namespace: {problem}")
    out = tmp_path_factory.mktemp("api-server")
    results = EngineRuns(out, parallel=1, timeout=720).run(
        {"chat": ["tests/engine/server_chat.py", "--model", tiny_model_dir]}, engine_env(), netns=True)
    res = get(results, "chat")
    failed = [r for r in res.get("on_clients", []) + res.get("ref_clients", []) if "error" in r]
    assert not failed, f"requests failed: {failed[:3]}"
    assert "metrics_error" not in res, res["metrics_error"]
    run_notes.append("api_server /metrics: "
                     + ", ".join(f"{k.split(':')[1]}={v:g}" for k, v in res["metrics"].items() if "host_cache" in k))
    return res


def test_every_reply_equals_the_never_evicting_server(served):
    ref, on = served["ref"], served["on"]
    assert len(on) == len(ref) == 18
    for a, b in zip(on, ref):
        assert a["completion_tokens"] > 0 and a["finish_reason"] in ("stop", "length"), a
        assert a["prompt_tokens"] == b["prompt_tokens"], (a, b)
    diffs = [(a["conversation"], a["turn"]) for a, b in zip(on, ref) if a["reply"] != b["reply"]]
    assert not diffs, f"(conversation, turn) whose reply differs from the never-evicting server: {diffs}"


def test_cached_tokens_count_host_hits(served):
    """usage.prompt_tokens_details.cached_tokens: the tier-on server reports
    what the never-evicting one does, though its 24-block GPU cache lost most
    of it; without the host hits it would report less."""
    ref, on, m = served["ref"], served["on"], served["metrics"]
    per_turn = [(a["conversation"], a["turn"], a["cached_tokens"], b["cached_tokens"])
                for a, b in zip(on, ref) if a["cached_tokens"] != b["cached_tokens"]]
    assert not per_turn, per_turn
    everything = on + served["on_clients"]  # both phases went to the same server
    hits = m["lmdeploy:host_cache_hit_tokens_total"]
    cached = sum(r["cached_tokens"] for r in everything)
    assert 0 < hits <= cached and hits % BLOCK_TOKENS == 0, (hits, cached)
    # LMDeploy's own counters on the same /metrics agree with the replies' usage
    assert m["lmdeploy:prompt_tokens_total"] == sum(r["prompt_tokens"] for r in everything)
    assert m["lmdeploy:cached_tokens_total"] == cached


def test_concurrent_streaming_clients_equal_their_sequential_reference(served):
    """32 clients at once, several turns each, on the 24-block server with
    the tier: none fails, and every reply equals the one the never-evicting
    server gave the same conversation with one request at a time."""
    on, ref = served["on_clients"], served["ref_clients"]
    assert len(on) == len(ref) == CLIENTS * CLIENT_TURNS
    by_turn = {(r["conversation"], r["turn"]): r for r in ref}
    for r in on:
        assert r["completion_tokens"] > 0 and r["finish_reason"] in ("stop", "length"), r
    # They ran together: at some moment most clients had a request in flight.
    events = sorted([(r["start"], 1) for r in on] + [(r["end"], -1) for r in on])
    in_flight = peak = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    assert peak >= CLIENTS // 2, peak
    # The phase went through the host tier: it added host hits and restores.
    before, after = served["metrics_sequential"], served["metrics"]
    for name in ("lmdeploy:host_cache_hit_tokens_total", "lmdeploy:host_cache_blocks_restored_total"):
        assert after[name] > before[name], (name, before[name], after[name])
    if MODE == "gpu":
        # bf16 kernels round per batch shape: a batched reply may differ
        # (docs/testing.md), and with it every later prompt of its conversation.
        assert all(r["prompt_tokens"] == by_turn[r["conversation"], 0]["prompt_tokens"] for r in on if r["turn"] == 0)
        return
    for r in on:
        assert r["prompt_tokens"] == by_turn[r["conversation"], r["turn"]]["prompt_tokens"], r
    diffs = [(r["conversation"], r["turn"]) for r in on if r["reply"] != by_turn[r["conversation"], r["turn"]]["reply"]]
    assert not diffs, f"(conversation, turn) whose concurrent reply differs from its sequential reference: {diffs}"


def test_metrics_agree_with_the_engine(served):
    m = served["metrics"]
    g = {k.split("host_cache_")[1].removesuffix("_total"): v for k, v in m.items() if "host_cache_" in k}
    assert g["slots_capacity"] == DEFAULT_RATIO * ON_GPU_BLOCKS  # --host-cache: the default ratio
    assert g["saved_bytes"] == g["blocks_saved"] * BLOCK_BYTES
    assert g["restored_bytes"] == g["blocks_restored"] * BLOCK_BYTES
    assert g["slots_used"] == g["blocks_saved"] - g["evictions"]
    assert g["occupancy"] == pytest.approx(g["slots_used"] / g["slots_capacity"])
    assert g["hit_ratio"] == pytest.approx(g["hit_tokens"] / g["queried_tokens"])
    assert g["blocks_restored"] * BLOCK_TOKENS <= g["hit_tokens"]  # restores skipped by trie dedup are not copied
    assert g["blocks_restored"] > 0 and g["saves_dropped"] == 0
    # Restore or recompute: the ranks live in the server process, so the
    # decision had both figures; on this CPU a copy beats recomputing.
    assert g["copy_bytes_per_second"] > 0 and g["prefill_tokens_per_second"] > 0, g
    assert g["recomputes_chosen"] == 0 and g["restores_chosen"] > 0, g
    # Histograms: one size per admission that restored, one latency per restore
    assert g["restore_size_bytes_count"] > 0 and g["restore_size_bytes_sum"] == g["restored_bytes"]
    assert g["restore_latency_seconds_count"] > 0
    assert m["lmdeploy:prefix_cache_hit_rate"] > 0
    assert not any("host_cache" in k for k in served["metrics_ref"]), "the tier-off server exports host figures"


def test_lmdeploy_chat_with_the_host_cache_flags(tiny_model_dir):
    words = "ba be bi bo bu " * 30
    script = f"{words}\n\n{words} da de\n\nexit\n\n"
    r = subprocess.run([sys.executable, "-m", "lmdeploy", "chat", tiny_model_dir, "--backend", "pytorch",
                        "--cache-max-entry-count", "0.005", "--host-cache-ratio", "2", "--host-cache-write-policy", "write_back",
                        "--session-len", "1024",
                        ], input=script, capture_output=True, text=True, timeout=240,
                       env=engine_env(), cwd=str(REPO))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "exiting..." in r.stdout, out[-3000:]
    assert "host cache on:" in out and "write policy write_back" in out, out[-3000:]
    assert r.stdout.count("double enter to end input") == 3, r.stdout[-2000:]


@pytest.mark.parametrize("server", ["ref", "on"])
def test_cache_salt_partitions_what_requests_share(served, server):
    """`cache_salt` in the request body (openai's extra_body): a salt shares
    with itself, no salt with no salt, and a new salt is served nothing
    cached (its TTFT reveals nothing); replies are equal under every salt."""
    res = served[f"{server}_salted"]
    got = res["chat"]
    cached = [(r["salt"], r["cached_tokens"]) for r in got]
    full = (got[0]["prompt_tokens"] - 1) // BLOCK_TOKENS * BLOCK_TOKENS
    assert full > 0 and cached == [("a", 0), ("a", full), ("b", 0), (None, 0), (None, full)], cached
    for endpoint, answer in (("chat", "reply"), ("completions", "text")):
        assert len({r[answer] for r in res[endpoint]}) == 1, res[endpoint]


def test_completions_share_only_within_a_salt(served):
    """/v1/completions reports no cached tokens in its usage (LMDeploy), so
    the server's own counter is read around the phase: the five requests (a,
    a, b, none, none) were served exactly two prompts' worth of full blocks,
    the second a and the second none. Were salts ignored, b and the first
    none would have been served too."""
    res, before, after = served["on_salted"], served["metrics"], served["metrics_salted"]
    chat = sum(r["cached_tokens"] for r in res["chat"])
    completions = after["lmdeploy:cached_tokens_total"] - before["lmdeploy:cached_tokens_total"] - chat
    full = (res["completions"][0]["prompt_tokens"] - 1) // BLOCK_TOKENS * BLOCK_TOKENS
    assert full > 0 and completions == 2 * full, (completions, full)


def test_a_bad_cache_salt_is_a_400_naming_the_field(served):
    refused = served["on_salted"]["refused"]
    assert len(refused) == 8
    for r in refused:
        assert r["status"] == 400 and "cache_salt" in r["message"], r
