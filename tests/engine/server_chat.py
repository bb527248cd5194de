"""Two `lmdeploy serve api_server` processes driven by the `openai` client,
for test_api_server.py; writes what they answered as JSON.

    python tests/engine/server_chat.py --model DIR --out FILE.json

Run it inside a private network namespace (conftest.in_private_netns): the
servers bind 127.0.0.1, their engine processes and whatever else listens
stay inside.

  ref : tier off, a GPU cache that never evicts;
  on  : `--host-cache` (default ratio) with a 24-block GPU cache.

Several conversations, turn by turn with the conversations interleaved, one
streaming request at a time (so both servers see the same schedule), greedy;
each reply is resent in the next turn as the assistant message. Then
--clients more conversations: on `ref` one request at a time (their greedy
reference), on `on` all at once, one thread per client, each streaming its
turns as fast as the server answers. Then the `on` server's /metrics, read
until LMDeploy's periodic statistics update has caught up with the last
request. Then, on both servers, a conversation and a completion prompt under
cache salts a, a, b, none, none, and salts each endpoint must refuse.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tiny_model  # noqa: E402
from benchmark.server_client import scrape_metrics  # noqa: E402
from procs import start, stop_tree, tail  # noqa: E402
from turns import write_json  # noqa: E402

START_TIMEOUT = 240
METRICS_TIMEOUT = 60   # LMDeploy refreshes schedule metrics about every 10 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    with opener.open(url, timeout=timeout) as r:
        return r.read().decode(errors="replace")


def start_server(model: str, args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lmdeploy", "serve", "api_server", model, "--backend", "pytorch",
           "--enable-prefix-caching", "--max-batch-size", "8", "--session-len", "4096", "--model-name", "tiny",
           "--server-name", "127.0.0.1", "--server-port", str(port), "--log-level", "WARNING", *args]
    proc = start(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=os.environ)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, base: str, log: Path) -> None:
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"api_server exited with {proc.returncode} while starting:\n{tail(log)}")
        if time.monotonic() - t0 > START_TIMEOUT:
            raise RuntimeError(f"api_server not ready after {START_TIMEOUT} s:\n{tail(log)}")
        try:
            http_get(base + "/v1/models")
            return
        except OSError:
            time.sleep(1.0)


def text(n: int, seed: int) -> str:
    import numpy as np

    w = tiny_model.words(505)
    rng = np.random.default_rng(seed)
    return " ".join(w[i] for i in rng.integers(0, len(w), n))


def ask(client, messages: list, max_tokens: int) -> dict:
    """One streamed greedy request: its reply and usage."""
    stream = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=max_tokens,
                                            temperature=0.0, stream=True, stream_options={"include_usage": True})
    reply, usage, finish = "", None, None
    for chunk in stream:
        if chunk.choices:
            reply += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    details = getattr(usage, "prompt_tokens_details", None)
    return {"reply": reply, "finish_reason": finish, "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": int(getattr(details, "cached_tokens", 0) or 0)}


def salted(base: str, max_tokens: int) -> dict:
    """One new conversation and one new completion prompt, each sent under
    salts a, a, b, none, none; and salts the server must refuse."""
    from openai import BadRequestError

    client = client_for(base)
    messages = [{"role": "system", "content": text(100, 90001)}, {"role": "user", "content": text(250, 90002)}]
    prompt = text(300, 90003)
    order = ["a", "a", "b", None, None]
    out: dict = {"chat": [], "completions": [], "refused": []}
    for salt in order:
        extra = {"cache_salt": salt} if salt is not None else {}
        stream = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=max_tokens,
                                                temperature=0.0, stream=True, stream_options={"include_usage": True},
                                                extra_body=extra)
        reply, usage = "", None
        for chunk in stream:
            if chunk.choices:
                reply += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        out["chat"].append({"salt": salt, "reply": reply, "cached_tokens": _cached(usage),
                            "prompt_tokens": usage.prompt_tokens})
        done = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                         extra_body=extra)
        # LMDeploy's /v1/completions reports no cached tokens: test_api_server reads them from /metrics
        out["completions"].append({"salt": salt, "text": done.choices[0].text,
                                   "prompt_tokens": done.usage.prompt_tokens})
    for endpoint in ("chat", "completions"):
        for bad in (7, "", "s" * 1025, ["a"]):
            try:
                if endpoint == "chat":
                    client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=1,
                                                   extra_body={"cache_salt": bad})
                else:
                    client.completions.create(model="tiny", prompt=prompt, max_tokens=1,
                                              extra_body={"cache_salt": bad})
                out["refused"].append({"endpoint": endpoint, "bad": repr(bad)[:20], "status": 200})
            except BadRequestError as e:
                out["refused"].append({"endpoint": endpoint, "bad": repr(bad)[:20], "status": e.status_code,
                                       "message": str(e)[:300]})
    return out


def _cached(usage) -> int:
    details = getattr(usage, "prompt_tokens_details", None)
    return int(getattr(details, "cached_tokens", 0) or 0)


def client_for(base: str):
    from openai import OpenAI

    return OpenAI(api_key="none", base_url=base + "/v1", timeout=300, max_retries=0)


def converse(base: str, conversations: int, turns: int, max_tokens: int) -> list[dict]:
    """Interleaved conversations, streamed; one record per request."""
    client = client_for(base)
    system = {"role": "system", "content": text(100, 1)}
    history = [[system] for _ in range(conversations)]
    out = []
    for t in range(turns):
        for c in range(conversations):
            history[c].append({"role": "user", "content": text(250, 100 * c + t)})
            out.append({"conversation": c, "turn": t, **ask(client, history[c], max_tokens)})
            history[c].append({"role": "assistant", "content": out[-1]["reply"]})
    return out


def one_client(base: str, c: int, turns: int, max_tokens: int) -> list[dict]:
    """Conversation c of the concurrent phase, its turns one after another;
    a failed request is a record with its error, not an exception."""
    client = client_for(base)
    history = [{"role": "system", "content": text(100, 1)}]
    out = []
    for t in range(turns):
        history.append({"role": "user", "content": text(60, 7000 + 100 * c + t)})
        t0 = time.monotonic()
        try:
            out.append({"conversation": c, "turn": t, **ask(client, history, max_tokens)})
        except Exception as e:  # noqa: BLE001 - the test asserts there is none
            out.append({"conversation": c, "turn": t, "error": f"{type(e).__name__}: {e}"})
            return out
        out[-1].update(start=t0, end=time.monotonic())
        history.append({"role": "assistant", "content": out[-1]["reply"]})
    return out


def clients(base: str, n: int, turns: int, max_tokens: int, concurrent: bool) -> list[dict]:
    """n conversations, all at once (one thread each) or one after another."""
    if not concurrent:
        return [r for c in range(n) for r in one_client(base, c, turns, max_tokens)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(one_client, base, c, turns, max_tokens) for c in range(n)]
        return [r for f in futures for r in f.result()]


def metric_values(base: str) -> dict[str, float]:
    """LMDeploy's samples on /metrics (the benchmark's scraper; one engine here,
    so summing over label sets changes nothing). Process metrics are left out:
    they change between any two reads."""
    return {k: v for k, v in scrape_metrics(base).items() if k.startswith("lmdeploy:")}


def settled_metrics(base: str, prompt_tokens: int) -> dict[str, float]:
    """/metrics once it counts every request's prompt tokens and two reads a
    statistics update apart agree; an error if that does not happen in time
    (main records it: a failed request's tokens may count on the server)."""
    deadline = time.monotonic() + METRICS_TIMEOUT
    last: dict = {}
    while time.monotonic() < deadline:
        now = metric_values(base)
        if now.get("lmdeploy:prompt_tokens_total") == prompt_tokens and now == last:
            return now
        last = now
        time.sleep(11.0)
    raise RuntimeError(f"/metrics did not settle on {prompt_tokens} prompt tokens in {METRICS_TIMEOUT} s: {last}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--conversations", type=int, default=6)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (0: none)")
    p.add_argument("--client-turns", type=int, default=3)
    a = p.parse_args(argv)
    logs = Path(a.out).parent
    servers = {"ref": ["--num-gpu-blocks", "512"], "on": ["--host-cache", "--num-gpu-blocks", "24"]}
    # engine_env() loads site/lmdeploy_start_race.py into the servers (LMDeploy's start-up race)
    procs = {k: start_server(a.model, v, logs / f"server-{k}.log") for k, v in servers.items()}
    result: dict = {"servers": servers}
    try:
        for k, (proc, base) in procs.items():
            wait_ready(proc, base, logs / f"server-{k}.log")
        for k, (_, base) in procs.items():
            result[k] = converse(base, a.conversations, a.turns, a.max_tokens)
        on_base = procs["on"][1]
        try:
            if a.clients:
                # the figures before the concurrent phase: what it adds is its own
                result["metrics_sequential"] = settled_metrics(on_base, sum(r["prompt_tokens"] for r in result["on"]))
                for k, (_, base) in procs.items():
                    result[f"{k}_clients"] = clients(base, a.clients, a.client_turns, a.max_tokens,
                                                     concurrent=k == "on")
            prompt = sum(r.get("prompt_tokens", 0) for r in result["on"] + result.get("on_clients", []))
            result["metrics"] = settled_metrics(on_base, prompt)
        except RuntimeError as e:  # the tests report it with what was answered
            result["metrics_error"] = str(e)
        result["metrics_ref"] = metric_values(procs["ref"][1])
        for k, (_, base) in procs.items():  # after the metrics: its requests are not in their sums
            result[f"{k}_salted"] = salted(base, a.max_tokens)
        if "metrics" in result:
            sent = sum(r["prompt_tokens"] for phase in ("chat", "completions") for r in result["on_salted"][phase])
            try:
                result["metrics_salted"] = settled_metrics(on_base, result["metrics"]["lmdeploy:prompt_tokens_total"]
                                                           + sent)
            except RuntimeError as e:
                result["metrics_error"] = str(e)
    finally:
        for proc, _ in procs.values():
            stop_tree(proc, grace=20)
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
