"""Multi-turn users against an in-process LMDeploy pipeline (PyTorch engine),
with the same records and counters as the API-server client, so
multiturn.summarize_server reads both.

Each request is its own LMDeploy session carrying the whole conversation
(as an OpenAI-style client does); reuse goes through the prefix cache and
the host tier only.
"""
from __future__ import annotations

import asyncio
import random
import time

from .server_client import RequestRecord, ramp_delay


def counters(engine, records: list[RequestRecord], cached: int) -> dict[str, float]:
    """The API server's /metrics names, from the engine's schedule metrics."""
    async def fetch():
        return await engine.get_schedule_metrics()

    m = asyncio.run_coroutine_threadsafe(fetch(), engine_loop(engine)).result(60)
    host = getattr(m, "host_cache", None) or {}
    return {
        "lmdeploy:prompt_tokens_total": float(sum(r.prompt_tokens for r in records)),
        "lmdeploy:cached_tokens_total": float(cached),
        "lmdeploy:prefix_cache_hit_rate": float(m.prefix_cache_hit_rate),
        "lmdeploy:host_cache_hit_tokens_total": float(host.get("host_hit_tokens", 0)),
        "lmdeploy:host_cache_restored_bytes_total": float(host.get("host_bytes_restored", 0)),
        "lmdeploy:host_cache_saved_bytes_total": float(host.get("host_bytes_saved", 0)),
        "lmdeploy:host_cache_restore_wait_seconds_total": float(host.get("host_restore_wait_seconds", 0.0)),
        "lmdeploy:host_cache_slots_used": float(host.get("host_slots_used", 0)),
        "lmdeploy:host_cache_occupancy": float(host.get("host_occupancy", 0.0)),
    }


def engine_loop(engine):
    return engine._pipe_loop


async def _one(engine, messages: list, gen_config, rec: RequestRecord) -> tuple[str, int]:
    session = engine.session_mgr.get()
    request = await engine.preprocess(messages=messages, session_id=session, gen_config=gen_config)
    rec.prompt_tokens = int(request.input_token_len)
    tokens: list[int] = []
    texts: list[str] = []
    cached, finish = 0, None
    rec.sent = time.perf_counter()
    async for out in engine.generate(request, stream_response=True):  # GenOut deltas
        new = list(out.token_ids or [])
        if new:
            now = time.perf_counter()
            if rec.first_token is None:
                rec.first_token = now
            rec.token_times.extend([now] * len(new))
            tokens += new
        texts.append(out.response or "")
        cached = max(cached, int(out.cached_tokens or 0))
        finish = getattr(out, "finish_reason", None) or finish
    rec.done = time.perf_counter()
    rec.output_tokens = len(tokens)
    if finish in ("abort", "error"):  # AsyncEngine.generate ends a dropped request with a GenOut, not a raise
        rec.error = f"finish_reason {finish}"
    # The tokenizer is the AsyncEngine's: LMDeploy 0.18's Pipeline has no `tokenizer`.
    return "".join(texts) or engine.tokenizer.decode(tokens), cached


def run_pipeline_users(pipe, conversations: list[list[tuple[str, int]]], concurrency: int, think_s: float,
                       seed: int, progress=None, ramp_s: float = 0.0) -> tuple[list[RequestRecord], dict, dict]:
    """Returns (records, counters before, counters after)."""
    from lmdeploy import GenerationConfig

    engine = pipe.async_engine
    engine._pipe_loop = pipe.internal_thread.loop
    rng = random.Random(seed)
    think = [[rng.expovariate(1 / think_s) if think_s > 0 else 0.0 for _ in c] for c in conversations]
    records: list[RequestRecord] = []
    cached_total = [0]
    total = sum(len(c) for c in conversations)

    async def main():
        sem = asyncio.Semaphore(concurrency)

        async def user(uid, conv):
            async with sem:
                await asyncio.sleep(ramp_delay(uid, concurrency, len(conversations), ramp_s))
                messages = []
                for t, (msg, reply_len) in enumerate(conv):
                    messages.append({"role": "user", "content": msg})
                    rec = RequestRecord(uid, t, 0.0)
                    gen = GenerationConfig(max_new_tokens=reply_len, do_sample=False, ignore_eos=True)
                    try:
                        reply, cached = await _one(engine, list(messages), gen, rec)
                    except Exception as e:  # noqa: BLE001 - recorded per request, the run goes on
                        rec.error = repr(e)
                        records.append(rec)
                        return
                    rec.reply = reply
                    cached_total[0] += cached
                    records.append(rec)
                    if progress:
                        progress(len(records), total)
                    if rec.error:
                        return
                    messages.append({"role": "assistant", "content": reply})
                    if t + 1 < len(conv):
                        await asyncio.sleep(think[uid][t])

        await asyncio.gather(*(user(u, c) for u, c in enumerate(conversations)))

    before = counters(engine, [], 0)
    asyncio.run_coroutine_threadsafe(main(), engine._pipe_loop).result()
    after = counters(engine, records, cached_total[0])
    return records, before, after
