"""LMDeploy 0.18.0's PyTorch engine with the host tier, on a real GPU
(issue 3, item 8), with the tiny random-weight Llama of tiny_model.py.

Engine runs (lmdeploy_turns.py, one process each, all at once on the GPU; 6
sessions x 4 turns, one request at a time, greedy, 16 new tokens):

  ref : tier off, 256 GPU blocks: nothing is ever evicted, every turn reuses
        the KV its session computed before, from the GPU prefix cache;
  off : tier off, 32 GPU blocks: later turns recompute evicted prefixes;
  on  : tier on (host_cache_ratio 8), 32 GPU blocks: evicted prefixes come
        back from host memory.

for bf16 (quant_policy 0) and 4-bit KV (quant_policy 4).

`on` must produce exactly `ref`'s tokens: a restored block holds the bytes
that were computed for it, which are the bytes `ref` kept on the GPU, so
every forward of `on` reads the same KV as `ref`'s (same prefix length, same
prompt, batch of one) and is bit-identical. `off` is the tier-off run with
the same small cache: its recomputed prefixes may differ from the first
computation in the last bits (other kernels), so it is compared with `ref`
only to show that eviction happened (fewer cached tokens); how many of its
turns still match is printed in the "GPU notes" section.

Then `lmdeploy serve api_server MODEL --backend pytorch --host-cache` (the
API server spawns its engine process) answers an OpenAI-client chat, a
second turn after other conversations evicted the first from the GPU, and
exports lmdeploy:host_cache_* and lmdeploy:prefix_cache_hit_rate on /metrics.

Skipped unless this build of lmdeploy_hostcache finds a usable GPU and
LMDeploy and openai are installed.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lmdeploy_hostcache import build_info

HERE = Path(__file__).resolve().parent


def _skip_reason() -> str | None:
    info = build_info()
    if not info["gpu_usable"]:
        return f"needs a usable GPU: {info['reason']}"
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    # Installed is enough here: the engine runs import it in their own processes
    # (and fail loudly if it does not import); this process stays LMDeploy-free.
    for mod in ("lmdeploy", "openai"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (scripts/prepare_gpu_wheels.sh, then scripts/gpu_all.sh)"
    return None


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

QUANTS = [0, 4]
GPU_BLOCKS_SMALL = 32   # 2048 tokens; one session's last turn needs <= 20 blocks
GPU_BLOCKS_REF = 256    # more than all six sessions' histories (~120 blocks)
HOST_RATIO = 8.0        # 256 host slots: every block saved stays
RUNS = {f"{kind}-q{q}": dict(quant=q, gpu_blocks=GPU_BLOCKS_REF if kind == "ref" else GPU_BLOCKS_SMALL,
                             host_ratio=HOST_RATIO if kind == "on" else 0.0)
        for q in QUANTS for kind in ("ref", "off", "on")}
ENGINE_RUNS_TIMEOUT = 300


def _stop_tree(proc: subprocess.Popen, grace: float) -> None:
    """Stop `proc` and every process it started: SIGINT and `grace` seconds
    to shut down cleanly (grace 0: none), then SIGKILL to whatever is left."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        kids = []
    if proc.poll() is None and grace > 0:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    for p in kids:
        try:
            p.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(no log: {e})"


@pytest.fixture(scope="module")
def engine_runs(tiny_model_dir, tmp_path_factory, gpu_notes) -> dict:
    """All six runs, started together; name -> result dict, or an error string."""
    out = tmp_path_factory.mktemp("engine-runs")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = {}
    t0 = time.monotonic()
    for name, r in RUNS.items():
        cmd = [sys.executable, str(HERE / "lmdeploy_turns.py"), "--model", tiny_model_dir, "--out", str(out / f"{name}.json"),
               "--quant-policy", str(r["quant"]), "--gpu-blocks", str(r["gpu_blocks"]),
               "--host-cache-ratio", str(r["host_ratio"])]
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(HERE.parent.parent)),
                       log)
    results: dict = {}
    try:
        for name, (proc, log) in procs.items():
            left = max(1.0, ENGINE_RUNS_TIMEOUT - (time.monotonic() - t0))
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                rc = None
            log.close()
            res_path = out / f"{name}.json"
            if rc == 0 and res_path.exists():
                results[name] = json.loads(res_path.read_text())
            else:
                why = "timed out" if rc is None else f"exit code {rc}"
                results[name] = f"{name}: {why}\n--- log tail ---\n{_tail(out / f'{name}.log')}"
    finally:
        for proc, log in procs.values():
            _stop_tree(proc, grace=0)
            log.close()
    gpu_notes.append(f"engine runs (6 at once): {time.monotonic() - t0:.0f} s wall")
    for name, res in results.items():
        if isinstance(res, dict):
            m = res["metrics"]
            host = m["host_cache"] or {}
            gpu_notes.append(
                f"  {name}: build {res['seconds']['import_and_build']} s, requests {res['seconds']['requests']} s, "
                f"cached tokens {sum(t['cached_tokens'] for t in res['turns'])}, "
                f"prefix_cache_hit_rate {m['prefix_cache_hit_rate']:.3f}"
                + (f", host hit tokens {host.get('host_hit_tokens')}, blocks saved {host.get('host_blocks_saved')}, "
                   f"restored {host.get('host_blocks_restored')}, evictions {host.get('host_evictions')}"
                   if host else ""))
        else:
            gpu_notes.append(f"  {res.splitlines()[0]}")
    return results


def _get(results: dict, name: str) -> dict:
    res = results[name]
    if not isinstance(res, dict):
        pytest.fail(res)
    return res


def _first_differences(a: dict, b: dict, limit: int = 5) -> list[str]:
    out = []
    for x, y in zip(a["turns"], b["turns"]):
        if x["tokens"] != y["tokens"]:
            i = next((k for k, (p, q) in enumerate(zip(x["tokens"], y["tokens"])) if p != q),
                     min(len(x["tokens"]), len(y["tokens"])))
            out.append(f"session {x['session']} turn {x['turn']}: input {x['input_len']} vs {y['input_len']} tokens, "
                       f"cached {x['cached_tokens']} vs {y['cached_tokens']}, first differing output token #{i}: "
                       f"{x['tokens'][i:i + 4]} vs {y['tokens'][i:i + 4]}")
            if len(out) >= limit:
                break
    return out


@pytest.mark.parametrize("quant", QUANTS)
def test_tier_on_generates_the_tokens_of_tier_off(engine_runs, quant):
    ref, on = _get(engine_runs, f"ref-q{quant}"), _get(engine_runs, f"on-q{quant}")
    assert len(on["turns"]) == len(ref["turns"]) == 24
    for t in on["turns"]:
        assert t["finish_reason"] == "length" and len(t["tokens"]) == 16, t
    diffs = _first_differences(on, ref)
    assert not diffs, "tier on (32 GPU blocks) vs tier off (256 GPU blocks, nothing evicted):\n" + "\n".join(diffs)


@pytest.mark.parametrize("quant", QUANTS)
def test_host_tier_serves_what_the_gpu_evicted(engine_runs, quant):
    ref, off, on = (_get(engine_runs, f"{k}-q{quant}") for k in ("ref", "off", "on"))
    # The tier is off where it was not asked for, and LMDeploy reports no host figures there.
    assert ref["metrics"]["host_cache"] is None and off["metrics"]["host_cache"] is None
    assert on["patch"].get("enabled") is True, on["patch"]
    host = on["metrics"]["host_cache"]
    assert host is not None, "ScheduleMetrics has no host_cache with the tier on"
    # Eviction happened: with the same 32 GPU blocks and no tier, less is reused than with 256.
    cached = {k: sum(t["cached_tokens"] for t in r["turns"]) for k, r in (("ref", ref), ("off", off), ("on", on))}
    assert cached["off"] < cached["ref"], cached
    assert host["host_hit_tokens"] > 0, host
    if "host_blocks_restored" in host:
        assert host["host_blocks_restored"] > 0, host
    # Host hits count as cached tokens: the tier gives back what eviction took.
    assert cached["on"] > cached["off"], cached
    assert on["metrics"]["prefix_cache_hit_rate"] > off["metrics"]["prefix_cache_hit_rate"], \
        (on["metrics"], off["metrics"])


@pytest.mark.parametrize("quant", QUANTS)
def test_tier_on_reuses_as_much_as_an_unbounded_gpu_cache(engine_runs, quant, gpu_notes):
    ref, off, on = (_get(engine_runs, f"{k}-q{quant}") for k in ("ref", "off", "on"))
    per_turn = [(t["session"], t["turn"], a["cached_tokens"], t["cached_tokens"])
                for t, a in zip(on["turns"], ref["turns"]) if t["cached_tokens"] != a["cached_tokens"]]
    same_off = sum(x["tokens"] == y["tokens"] for x, y in zip(off["turns"], ref["turns"]))
    gpu_notes.append(f"q{quant}: tier off with 32 blocks (recompute) matches the reference on {same_off}/24 turns; "
                     f"tier on differs from the reference's cached tokens on {len(per_turn)}/24 turns")
    assert not per_turn, "(session, turn, cached tokens ref, cached tokens on): " + repr(per_turn[:8])


# ---------------------------------------------------------------- API server

SERVER_START_TIMEOUT = 180
METRICS_TIMEOUT = 45   # the API server refreshes schedule metrics every 10 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    req = urllib.request.Request(url)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    with opener.open(req, timeout=timeout) as r:
        return r.status, r.read().decode(errors="replace")


@pytest.fixture(scope="module")
def api_server(tiny_model_dir, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("api-server") / "api_server.log"
    cmd = [sys.executable, "-m", "lmdeploy", "serve", "api_server", tiny_model_dir, "--backend", "pytorch",
           "--host-cache", "--num-gpu-blocks", "24", "--enable-prefix-caching", "--max-batch-size", "8",
           "--session-len", "4096", "--model-name", "tiny", "--server-name", "127.0.0.1",
           "--server-port", str(port), "--log-level", "WARNING"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"api_server exited with {proc.returncode} while starting:\n{_tail(log_path)}")
            if time.monotonic() - t0 > SERVER_START_TIMEOUT:
                pytest.fail(f"api_server not ready after {SERVER_START_TIMEOUT} s:\n{_tail(log_path)}")
            try:
                if _http_get(base + "/v1/models")[0] == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        yield {"base": base, "log": log_path, "started_in": time.monotonic() - t0}
    finally:
        # uvicorn's graceful shutdown closes the engine; then the spawned engine process, if it outlived it.
        _stop_tree(proc, grace=30)
        log.close()


def _words(n: int, seed: int) -> str:
    import numpy as np

    import tiny_model

    w = tiny_model.words(505)
    rng = np.random.default_rng(seed)
    return " ".join(w[i] for i in rng.integers(0, len(w), n))


@pytest.fixture(scope="module")
def chat(api_server, gpu_notes):
    """A two-turn conversation, with six other conversations in between that
    push its first turn out of the 24-block GPU cache."""
    from openai import OpenAI

    client = OpenAI(api_key="none", base_url=api_server["base"] + "/v1", timeout=120, max_retries=0)
    models = [m.id for m in client.models.list().data]
    assert models == ["tiny"], models
    system = {"role": "system", "content": _words(120, 1)}

    def ask(messages):
        r = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8, temperature=0.0)
        assert r.choices and r.choices[0].message is not None, r
        return r

    first = [system, {"role": "user", "content": _words(300, 2)}]
    r1 = ask(first)
    for k in range(6):
        ask([system, {"role": "user", "content": _words(300, 10 + k)}])
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content or ""},
                      {"role": "user", "content": _words(60, 3)}]
    r2 = ask(second)
    gpu_notes.append(f"api_server: ready in {api_server['started_in']:.0f} s; turn 1 {r1.usage}; turn 2 {r2.usage}")
    return {"r1": r1, "r2": r2}


def test_api_server_answers_an_openai_chat(chat):
    for r in (chat["r1"], chat["r2"]):
        assert r.choices[0].finish_reason in ("stop", "length"), r
        assert r.usage.prompt_tokens > 300 and 0 < r.usage.completion_tokens <= 8, r.usage
    assert chat["r2"].usage.prompt_tokens > chat["r1"].usage.prompt_tokens


def _metric_values(text: str, name: str) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([-+0-9.eEinfINFnaN]+)$",
                                                    text, re.MULTILINE)]


def test_api_server_exports_host_cache_metrics(api_server, chat, gpu_notes):
    deadline = time.monotonic() + METRICS_TIMEOUT
    text = ""
    while time.monotonic() < deadline:
        status, text = _http_get(api_server["base"] + "/metrics")
        assert status == 200
        hits = _metric_values(text, "lmdeploy:host_cache_hit_tokens")
        if hits and hits[0] > 0:
            break
        time.sleep(2.0)
    host_lines = [ln for ln in text.splitlines() if ln.startswith("lmdeploy:host_cache_")]
    gpu_notes.append("api_server /metrics: " + "; ".join(host_lines[:16]))
    assert host_lines, "no lmdeploy:host_cache_* on /metrics after %d s:\n%s\n--- server log ---\n%s" % (
        METRICS_TIMEOUT, "\n".join(ln for ln in text.splitlines() if ln.startswith("lmdeploy:")),
        _tail(api_server["log"], 40))
    rate = _metric_values(text, "lmdeploy:prefix_cache_hit_rate")
    assert rate and rate[0] > 0, [ln for ln in text.splitlines() if "prefix_cache_hit_rate" in ln]
    hits = _metric_values(text, "lmdeploy:host_cache_hit_tokens")
    assert hits and hits[0] > 0, "the second turn found nothing in host memory:\n" + "\n".join(host_lines)
