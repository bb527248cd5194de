"""Multi-turn users against a running `lmdeploy serve api_server`, over its
OpenAI-compatible API with streaming, timing tokens as a user sees them; and
a helper that starts and stops such a server.

Each user sends the whole conversation so far (the server's own earlier
replies included) and waits for the streamed reply; the server's prefix
cache and host tier see every turn's prompt as an extension of the last.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RequestRecord:
    user: int
    turn: int
    sent: float
    first_token: Optional[float] = None
    done: Optional[float] = None
    token_times: list = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    reply: str = ""  # the streamed text (greedy runs: tier off and on must agree)


def scrape_metrics(base_url: str) -> dict[str, float]:
    """/metrics as {name: value summed over label sets}."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{")[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return out


async def _chat(session, base_url: str, model: str, messages: list, max_tokens: int, rec: RequestRecord) -> str:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    parts = []
    rec.sent = time.perf_counter()
    async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            return ""
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                # LMDeploy reports an engine failure mid-stream as an HTTP 200 `data: {"error": ...}`
                # chunk, then [DONE] (chat_completions/serving.py): a failed request, not a short reply.
                rec.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                return ""
            usage = chunk.get("usage")
            if usage:
                rec.prompt_tokens = usage.get("prompt_tokens", 0)
                rec.output_tokens = usage.get("completion_tokens", 0)
            for choice in chunk.get("choices", []):
                if choice.get("finish_reason") in ("abort", "error"):  # the engine dropped the request
                    rec.error = f"finish_reason {choice['finish_reason']}"
                text = (choice.get("delta") or {}).get("content")
                if text:
                    now = time.perf_counter()
                    if rec.first_token is None:
                        rec.first_token = now
                    rec.token_times.append(now)
                    parts.append(text)
    rec.done = time.perf_counter()
    return "".join(parts)


def ramp_delay(uid: int, concurrency: int, users: int, ramp_s: float) -> float:
    """When user `uid` of the first wave arrives (users start in uid order)."""
    first = min(concurrency, users)
    return ramp_s * uid / first if uid < first else 0.0


async def run_users(base_url: str, model: str, conversations: list[list[tuple[str, int]]], concurrency: int,
                    think_s: float, seed: int, progress=None, ramp_s: float = 0.0) -> list[RequestRecord]:
    """conversations[u] = [(user message, reply length), ...]; ramp_s spreads
    the first `concurrency` users' arrivals evenly over that many seconds."""
    import aiohttp

    rng = random.Random(seed)
    think = [[rng.expovariate(1 / think_s) if think_s > 0 else 0.0 for _ in c] for c in conversations]
    records: list[RequestRecord] = []
    sem = asyncio.Semaphore(concurrency)
    total = sum(len(c) for c in conversations)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)

    async def user(uid: int, conv: list[tuple[str, int]]) -> None:
        async with sem:
            await asyncio.sleep(ramp_delay(uid, concurrency, len(conversations), ramp_s))
            messages: list = []
            async with aiohttp.ClientSession(timeout=timeout) as session:
                for t, (msg, reply_len) in enumerate(conv):
                    messages.append({"role": "user", "content": msg})
                    rec = RequestRecord(uid, t, 0.0)
                    reply = await _chat(session, base_url, model, messages, reply_len, rec)
                    rec.reply = reply
                    records.append(rec)
                    if progress:
                        progress(len(records), total)
                    if rec.error:
                        return
                    messages.append({"role": "assistant", "content": reply})
                    if t + 1 < len(conv):
                        await asyncio.sleep(think[uid][t])

    await asyncio.gather(*(user(u, c) for u, c in enumerate(conversations)))
    return records


class ApiServer:
    """`lmdeploy serve api_server` in a subprocess; ready when /v1/models answers."""

    def __init__(self, model: str, port: int, extra_args: list[str], log_path: str):
        self.cmd = [sys.executable, "-m", "lmdeploy", "serve", "api_server", model, "--backend", "pytorch",
                    "--server-name", "127.0.0.1", "--server-port", str(port), *extra_args]
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None

    # LMDeploy 0.18.0's api_server can lose its engine process while starting:
    # ZMQMPEngine._start_mp_proc leaves `with mp.Manager()` as soon as the engine
    # process has published its port, and that process's release of the Manager's
    # condition then finds the Manager gone (EOFError at `with condition:`, then
    # "PyTorch ZMQ engine process is not alive"). Seen on a busy 2-core machine
    # in between 1 start in 10 and 1 in 3, with or without the tier; that failure,
    # and only it, is retried once. (The engine tests avoid it differently:
    # tests/engine/site/lmdeploy_start_race.py.)
    STARTUP_RACE = ("with condition:", "EOFError")

    def __enter__(self) -> "ApiServer":
        self._log = open(self.log_path, "w")
        try:
            for attempt in range(2):
                self._log.write(" ".join(self.cmd) + "\n")
                self._log.flush()
                if self._start():
                    return self
                with open(self.log_path, errors="replace") as f:
                    log = f.read()
                raced = all(s in log for s in self.STARTUP_RACE)
                if attempt or not raced:
                    raise RuntimeError(f"api_server exited with {self.proc.returncode}; see {self.log_path}")
                self._log.write("# benchmark: the engine process was lost in LMDeploy's start-up race; retrying\n")
        except BaseException:
            self.__exit__()  # a server still starting (timeout, Ctrl-C) is stopped, not left behind
            raise

    def _start(self) -> bool:
        """True once it answers; False if it exits first."""
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=2) as r:
                    self.model_name = json.loads(r.read())["data"][0]["id"]
                    return True
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"api_server not ready after 300 s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
