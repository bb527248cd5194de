"""The benchmark's HTTP client against a local stand-in for LMDeploy's
OpenAI-compatible server (same SSE stream and /metrics format)."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import threading

import pytest

web = pytest.importorskip("aiohttp.web")

from benchmark import multiturn  # noqa: E402
from benchmark.server_client import ramp_delay, run_users, scrape_metrics  # noqa: E402


class FakeServer:
    """Streams `max_tokens` words per reply; counts tokens as LMDeploy would
    (one token per word; the earlier turns of a conversation are 'cached')."""

    def __init__(self, fail: str = "") -> None:
        self.fail = fail  # "error-chunk" or "abort": how the second request of every conversation ends
        self.requests: list[list[dict]] = []
        self.counters = {"prompt": 0, "cached": 0, "host": 0}
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def models(self, request):
        return web.json_response({"data": [{"id": "fake"}]})

    async def chat(self, request):
        body = await request.json()
        msgs = body["messages"]
        self.requests.append(msgs)
        words = sum(len(m["content"].split()) for m in msgs)
        earlier = sum(len(m["content"].split()) for m in msgs[:-1])
        self.counters["prompt"] += words
        self.counters["cached"] += earlier
        self.counters["host"] += earlier // 2
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = body["max_tokens"]
        for i in range(n):
            await asyncio.sleep(0.002)
            chunk = {"choices": [{"delta": {"content": f"w{len(msgs)}_{i} "}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if self.fail and len(msgs) == 3:
            # How LMDeploy ends a request its engine dropped: an HTTP 200 stream
            # with an error chunk (chat_completions/serving.py) or an abort finish.
            last = ({"error": {"message": "engine failed", "code": 500}} if self.fail == "error-chunk" else
                    {"choices": [{"delta": {}, "finish_reason": "abort"}]})
            await resp.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
            return resp
        usage = {"choices": [], "usage": {"prompt_tokens": words, "completion_tokens": n}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return resp

    async def metrics(self, request):
        c = self.counters
        text = "\n".join([
            "# HELP lmdeploy:prompt_tokens_total x",
            f'lmdeploy:prompt_tokens_total{{model_name="fake",engine="0"}} {c["prompt"]}',
            f'lmdeploy:cached_tokens_total{{model_name="fake",engine="0"}} {c["cached"]}',
            f'lmdeploy:host_cache_hit_tokens_total{{model_name="fake",engine="0"}} {c["host"]}',
            f'lmdeploy:host_cache_restored_bytes_total{{model_name="fake",engine="0"}} {c["host"] * 1000}',
            f'lmdeploy:host_cache_restore_wait_seconds_total{{model_name="fake",engine="0"}} {c["host"] * 1e-6}',
        ])
        return web.Response(text=text + "\n")

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_users_walk_conversations_and_metrics_add_up():
    srv = FakeServer()
    try:
        url = f"http://127.0.0.1:{srv.port}"
        convs = [[(f"hello {u} turn {t} " * 3, 5) for t in range(3)] for u in range(4)]
        before = scrape_metrics(url)
        records = asyncio.run(run_users(url, "fake", convs, concurrency=2, think_s=0.01, seed=0, ramp_s=0.4))
        after = scrape_metrics(url)
    finally:
        srv.close()
    assert len(records) == 12 and not any(r.error for r in records)
    first = {r.user: r.sent for r in records if r.turn == 0}
    assert first[1] - first[0] >= 0.15  # the first wave of 2 users spread over 0.4 s
    # each turn sends the whole conversation: the server's own earlier replies included
    longest = max(srv.requests, key=len)
    assert [m["role"] for m in longest] == ["user", "assistant", "user", "assistant", "user"]
    assert longest[1]["content"].startswith("w1_0 ")
    assert all(r.first_token > r.sent and len(r.token_times) == 5 and r.output_tokens == 5 for r in records)
    s = multiturn.summarize_server(records, before, after, pinned_gbps=50.0)
    assert s["requests"] == 12 and s["output_tokens"] == 60
    assert s["tokens_gpu_hit"] + s["tokens_host_hit"] + s["tokens_recomputed"] == s["prompt_tokens"] > 0
    assert s["tokens_host_hit"] == srv.counters["host"] and s["restore_gbps"] == pytest.approx(1000 / 1e-6 / 1e9)
    assert 0 < s["ttft_p50_s"] < 5 and s["itl_p50_s"] > 0


@pytest.mark.parametrize("fail", ["error-chunk", "abort"])
def test_a_request_the_engine_dropped_counts_as_failed(fail):
    """A 200 stream that ends in an error chunk or an abort finish is a failed
    request, and that user's conversation stops there."""
    srv = FakeServer(fail=fail)
    try:
        url = f"http://127.0.0.1:{srv.port}"
        convs = [[(f"hello {u} turn {t} ", 3) for t in range(3)] for u in range(2)]
        records = asyncio.run(run_users(url, "fake", convs, concurrency=2, think_s=0.0, seed=0))
    finally:
        srv.close()
    failed = [r for r in records if r.error]
    assert sorted((r.user, r.turn) for r in failed) == [(0, 1), (1, 1)], [(r.user, r.turn, r.error) for r in records]
    assert all(("stream error" if fail == "error-chunk" else "finish_reason abort") in r.error for r in failed)
    assert len(records) == 4  # the third turns were never sent


def test_ramp_spreads_only_the_first_wave():
    assert [ramp_delay(u, 4, 10, 8.0) for u in range(6)] == [0.0, 2.0, 4.0, 6.0, 0.0, 0.0]
    assert [ramp_delay(u, 8, 2, 1.0) for u in range(2)] == [0.0, 0.5]  # fewer users than the concurrency
    assert ramp_delay(3, 4, 10, 0.0) == 0.0


class FakePipe:
    """The parts of an LMDeploy Pipeline the pipeline client uses, with an
    engine that streams `max_new_tokens` tokens per request."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.internal_thread = SimpleNamespace(loop=self.loop)
        self.tokenizer = SimpleNamespace(decode=lambda ids: " ".join(f"t{i}" for i in ids))
        self.seen: list = []
        hits = {"host": 0}
        ns = SimpleNamespace

        class Engine:
            session_mgr = ns(get=lambda: object())

            async def preprocess(self_, messages, session_id, gen_config):
                self.seen.append(list(messages))
                return ns(input_token_len=sum(len(m["content"].split()) for m in messages), gen=gen_config,
                          earlier=sum(len(m["content"].split()) for m in messages[:-1]))

            async def generate(self_, request, stream_response=True):
                hits["host"] += request.earlier // 2
                for i in range(request.gen.max_new_tokens):
                    await asyncio.sleep(0.001)
                    yield ns(token_ids=[i], response=f"r{i} ", cached_tokens=request.earlier)

            async def get_schedule_metrics(self_):
                return ns(prefix_cache_hit_rate=0.5, host_cache={"host_hit_tokens": hits["host"]})

        self.async_engine = Engine()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_pipeline_users_walk_conversations():
    from benchmark.pipeline_client import run_pipeline_users

    pipe = FakePipe()
    try:
        convs = [[(f"hi {u} {t}", 4) for t in range(3)] for u in range(3)]
        records, before, after = run_pipeline_users(pipe, convs, concurrency=2, think_s=0.01, seed=0)
    finally:
        pipe.close()
    assert len(records) == 9 and not any(r.error for r in records)
    assert max(len(m) for m in pipe.seen) == 5 and pipe.seen[-1][1]["content"] == "r0 r1 r2 r3 "
    s = multiturn.summarize_server(records, before, after, pinned_gbps=50.0)
    assert s["output_tokens"] == 36 and s["prompt_tokens"] == sum(r.prompt_tokens for r in records)
    assert s["tokens_gpu_hit"] + s["tokens_host_hit"] + s["tokens_recomputed"] == s["prompt_tokens"]
    assert s["tokens_host_hit"] == after["lmdeploy:host_cache_hit_tokens_total"] > 0
