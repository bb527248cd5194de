"""Multi-turn greedy sessions through LMDeploy 0.18.0's real engine
(pipeline -> AsyncEngine -> Engine -> ModelAgent -> CacheEngine -> model
forward), with the tiny random-weight Llama of tiny_model.py, on a GPU or on
the CPU through the test-only shim (conftest.py).

Each configuration is one process (turns.py): 6 sessions x 4 turns, greedy,
16 new tokens, sessions interleaved so that a later turn's prefix has been
evicted from a 32-block GPU cache by the other sessions' turns in between.

  ref : tier off, 256 GPU blocks: nothing is ever evicted, every turn reuses
        what its session computed before from the GPU prefix cache;
  off : tier off, 32 GPU blocks: later turns recompute evicted prefixes;
  on  : tier on, 32 GPU blocks, host pool 8x: evicted prefixes come back
        from host memory.

`on` must reproduce `ref` exactly, turn for turn: the same tokens (a
restored block holds the bytes that were computed for it, the bytes `ref`
kept on the GPU) and the same cached-token count (every block `ref` served
from its cache, `on` serves from GPU or host). The covering set below spans
quant policies 0/4/8, the three write policies, and turns sent one at a
time or a turn's requests in flight together; bf16 throughout.
write_through_selective saves only blocks that showed reuse (served by the
GPU cache, or evicted while turns are being continued:
lmdeploy_patch/scheduler_tier.py), so it is held to equal tokens, to cached
tokens never above the reference's, and to more cached tokens than the same
cache without the tier.
The negative control corrupts restored blocks after they land and must make
tokens differ.

Concurrent turns batch differently from their reference. On CPU that
changes nothing (the shim's numerics are batch-invariant, docs/testing.md);
on a GPU bf16 results depend on the batch, so there the concurrent runs
resend fixed replies (their prompts then do not depend on what was
generated) and are held to the reference's cached tokens, not its tokens.
"""
from __future__ import annotations

import pytest

from conftest import EngineRuns, engine_env, get

SMALL, REF_BLOCKS, HOST_RATIO = 32, 256, 8.0
TURNS = 6 * 4


def _argv(model: str, quant: int, blocks: int, ratio: float = 0.0, policy: str = "write_through",
          concurrent: bool = False, fault: str | None = None, eager: bool = True, fixed: bool = False) -> list[str]:
    argv = ["tests/engine/turns.py", "--model", model, "--quant-policy", str(quant), "--gpu-blocks", str(blocks),
            "--host-cache-ratio", str(ratio), "--write-policy", policy]
    argv += ["--concurrent"] * concurrent + ["--eager"] * eager + ["--fixed-replies"] * fixed
    return argv + (["--fault", fault] if fault else [])


# name -> (quant, write policy, concurrent); the GPU runs the first two with CUDA graphs too.
ON_RUNS = {
    "on-q0-wt": (0, "write_through", False),
    "on-q4-wb-conc": (4, "write_back", True),
    "on-q8-wt": (8, "write_through", False),
    "on-q0-sel-conc": (0, "write_through_selective", True),
}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory, engine_mode, run_notes) -> dict:
    m = tiny_model_dir
    # On a GPU, concurrent runs resend fixed replies: their batches differ from
    # the reference's, and with them the bf16 results (module docstring).
    fixed = engine_mode == "gpu"
    jobs = {f"ref-q{q}{'-conc' * c}": _argv(m, q, REF_BLOCKS, concurrent=c, fixed=fixed and c)
            for q, _, c in ON_RUNS.values()}
    jobs["off-q0"] = _argv(m, 0, SMALL)
    jobs["off-q0-conc"] = _argv(m, 0, SMALL, concurrent=True, fixed=fixed)
    for name, (q, policy, c) in ON_RUNS.items():
        jobs[name] = _argv(m, q, SMALL, HOST_RATIO, policy, c, fixed=fixed and c)
    jobs["fault-q0"] = _argv(m, 0, SMALL, HOST_RATIO, fault="corrupt-restores")
    if engine_mode == "gpu":  # CUDA graphs (eager_mode=False): only a GPU has them
        for name in ("on-q0-wt", "on-q4-wb-conc"):
            q, policy, c = ON_RUNS[name]
            jobs[name + "-graphs"] = _argv(m, q, SMALL, HOST_RATIO, policy, c, eager=False, fixed=fixed and c)
    parallel = 2 if engine_mode == "cpu" else 6
    results = EngineRuns(tmp_path_factory.mktemp("engine-turns"), parallel, timeout=300).run(jobs, engine_env())
    for name, res in results.items():
        if isinstance(res, dict):
            host = res["metrics"]["host_cache"] or {}
            run_notes.append(f"{engine_mode} {name}: {res['seconds']}, cached tokens "
                             f"{sum(t['cached_tokens'] for t in res['turns'])}, host hit tokens "
                             f"{host.get('host_hit_tokens')}, restored {host.get('host_blocks_restored')}")
    return results


def _ref_name(name: str) -> str:
    q, _, c = ON_RUNS[name.removesuffix("-graphs")]
    return f"ref-q{q}{'-conc' * c}"


def _differences(a: dict, b: dict, what: str, limit: int = 5) -> list[str]:
    out = []
    for x, y in zip(a["turns"], b["turns"]):
        if x[what] != y[what]:
            out.append(f"session {x['session']} turn {x['turn']}: input {x['input_len']} tokens, cached "
                       f"{x['cached_tokens']} vs {y['cached_tokens']}, tokens {x['tokens'][:6]} vs {y['tokens'][:6]}")
    return out[:limit]


@pytest.mark.parametrize("name", list(ON_RUNS) + [f"{n}-graphs" for n in ("on-q0-wt", "on-q4-wb-conc")])
def test_tier_on_generates_the_reference_tokens(runs, name, engine_mode):
    if name not in runs:
        pytest.skip("CUDA graphs run on a GPU only")
    if engine_mode == "gpu" and ON_RUNS[name.removesuffix("-graphs")][2]:
        pytest.skip("concurrent turns batch differently from the reference: token equality is verified on CPU")
    on, ref = get(runs, name), get(runs, _ref_name(name))
    assert len(on["turns"]) == len(ref["turns"]) == TURNS
    for t in on["turns"]:
        assert t["finish_reason"] == "length" and len(t["tokens"]) == 16, t
    diffs = _differences(on, ref, "tokens")
    assert not diffs, f"{name} vs {_ref_name(name)} (never evicts):\n" + "\n".join(diffs)


@pytest.mark.parametrize("name", list(ON_RUNS) + [f"{n}-graphs" for n in ("on-q0-wt", "on-q4-wb-conc")])
def test_tier_on_caches_what_the_reference_cached(runs, name):
    if name not in runs:
        pytest.skip("CUDA graphs run on a GPU only")
    on, ref = get(runs, name), get(runs, _ref_name(name))
    host = on["metrics"]["host_cache"]
    assert on["patch"].get("enabled") is True and host is not None, (on["patch"], on["metrics"])
    assert host["host_hit_tokens"] > 0 and host["host_blocks_restored"] > 0, host
    if ON_RUNS[name.removesuffix("-graphs")][1] == "write_through_selective":
        # It saves only blocks that showed reuse, so it may cache less
        # than the reference, but more than the same cache without the tier.
        off = get(runs, "off-q0-conc")
        over = [(a["session"], a["turn"], a["cached_tokens"], b["cached_tokens"])
                for a, b in zip(on["turns"], ref["turns"]) if a["cached_tokens"] > b["cached_tokens"]]
        assert not over, f"cached more than the reference (session, turn, on, ref): {over}"
        total = {k: sum(t["cached_tokens"] for t in r["turns"]) for k, r in (("on", on), ("off", off))}
        assert total["on"] > total["off"], total
    else:
        diffs = _differences(on, ref, "cached_tokens")
        assert not diffs, f"{name} vs {_ref_name(name)}, cached tokens per turn:\n" + "\n".join(diffs)


def test_the_small_cache_really_evicts(runs):
    ref, off, on = get(runs, "ref-q0"), get(runs, "off-q0"), get(runs, "on-q0-wt")
    cached = {k: sum(t["cached_tokens"] for t in r["turns"]) for k, r in (("ref", ref), ("off", off), ("on", on))}
    assert cached["off"] < cached["ref"] == cached["on"], cached
    assert ref["metrics"]["host_cache"] is None and off["metrics"]["host_cache"] is None
    assert on["metrics"]["prefix_cache_hit_rate"] > off["metrics"]["prefix_cache_hit_rate"]


def test_corrupted_restores_change_the_tokens(runs):
    """Negative control: the same run as on-q0-wt with every restored block
    zeroed after it landed. The equality checks above must be able to fail."""
    bad, ref = get(runs, "fault-q0"), get(runs, "ref-q0")
    assert bad["metrics"]["host_cache"]["host_blocks_restored"] > 0
    differing = sum(a["tokens"] != b["tokens"] for a, b in zip(bad["turns"], ref["turns"]))
    assert differing > 0, "zeroed restored blocks went unnoticed: the token comparison cannot fail"
