"""One LMDeploy pipeline (PyTorch engine, in this process) through a fixed
multi-turn plan under greedy decoding; writes what it generated as JSON.

    python tests/engine/turns.py --model DIR --out FILE.json [--quant-policy 4]
        [--gpu-blocks 32] [--host-cache-ratio 8] [--write-policy write_back]
        [--concurrent] [--fault corrupt-restores] [--faults SPEC] [--verify] [--balance]
        [--block-size 32] [--plan-turns 3] [--host-cache-store FILE] [--signal N:SIG:PID]

Used by test_engine_turns.py, one process per engine configuration (a fresh
interpreter each: no engine state, CUDA context, patch or shim state leaks
from one configuration into the next).

The plan: S sessions of T turns, run turn by turn with the sessions
interleaved (turn 1 of every session, then turn 2, ...), one request at a
time, or with --concurrent every session's request of a turn in flight
together. Every prompt is token ids (no chat-template round trip through text):

    <s> SYSTEM | <|user|> words <|end|> <|assistant|> REPLY <|end|> | ... | <|user|> words <|end|> <|assistant|>

where SYSTEM (150 tokens) is shared by all sessions and each REPLY is the
greedy tokens this engine generated for that turn, so turn t's prompt
repeats turn t-1's prompt and reply exactly. With a GPU cache smaller than
the sessions' histories, the prefix of a later turn has been evicted from
the GPU by the other sessions' turns in between.

Each request is its own LMDeploy session (the pipeline API is stateless);
reuse across turns goes only through the prefix cache, as it does for an
OpenAI-style client that resends the conversation.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # tests/: balance.py

import tiny_model  # noqa: E402

SYSTEM_TOKENS = 150


def make_plan(word_ids: list[int], sessions: int, turns: int, seed: int = 1234, reply_tokens: int = 16) -> dict:
    """Token ids of the shared system prompt, of every user message, and of
    fixed replies (used instead of the generated ones with --fixed-replies)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    system = rng.choice(word_ids, SYSTEM_TOKENS).tolist()
    users = [[rng.choice(word_ids, int(rng.integers(150, 260))).tolist() for _ in range(turns)]
             for _ in range(sessions)]
    replies = [[rng.choice(word_ids, reply_tokens).tolist() for _ in range(turns)] for _ in range(sessions)]
    return {"system": system, "users": users, "replies": replies}


def prompt_ids(special: dict[str, int], plan: dict, history: list[tuple[list[int], list[int]]],
               user: list[int]) -> list[int]:
    """<s> system, then each (user, reply) turn of `history`, then `user` and the generation prompt."""
    ids = [special["<s>"], special["<|system|>"], *plan["system"], special["<|end|>"]]
    for u, reply in history:
        ids += [special["<|user|>"], *u, special["<|end|>"], special["<|assistant|>"], *reply, special["<|end|>"]]
    ids += [special["<|user|>"], *user, special["<|end|>"], special["<|assistant|>"]]
    return ids


async def _generate(engine, input_ids: list[int], gen_config) -> dict:
    """One request through AsyncEngine.preprocess/generate, as Pipeline._infer does it."""
    session = engine.session_mgr.get()
    request = await engine.preprocess(messages=None, session_id=session, gen_config=gen_config, input_ids=input_ids)
    tokens: list[int] = []
    cached, finish, gen_len = 0, None, 0
    async for out in engine.generate(request, stream_response=False):
        tokens += list(out.token_ids or [])
        cached = max(cached, int(out.cached_tokens or 0))
        finish = out.finish_reason or finish
        gen_len = out.generate_token_len
    return {"tokens": tokens, "cached_tokens": cached, "finish_reason": finish, "generate_token_len": gen_len}


def on_engine_loop(pipe, coro, timeout: float):
    """Runs a coroutine on the pipeline's engine loop (as Pipeline does) and waits for it."""
    return asyncio.run_coroutine_threadsafe(coro, pipe.internal_thread.loop).result(timeout=timeout)


def _metrics(m) -> dict:
    """LMDeploy's ScheduleMetrics; the patch adds `host_cache` (a dict) with the tier on."""
    host = getattr(m, "host_cache", None)
    return {"prefix_cache_hit_rate": float(m.prefix_cache_hit_rate), "cache_usage": float(m.cache_usage),
            "host_cache": dict(host) if host is not None else None}


def corrupt_restores() -> None:
    """Test-only fault: zero every block right after its host restore landed
    (and before the model reads it). The tokens must then differ from the
    reference's, which is what shows the equality tests can fail."""
    from lmdeploy_patch import rank_tier

    before_model = rank_tier.WorkerTier.before_model

    def corrupted(self, plan, stream):
        before_model(self, plan, stream)
        if plan is None or not len(plan.restore_blocks):
            return
        for pool in self.store._allocation.pools:
            t = pool.tensor  # [layers, kernel blocks, bytes]
            per = t.shape[1] // self.store.num_device_blocks
            for b in plan.restore_blocks.tolist():
                t[:, b * per:(b + 1) * per].zero_()

    rank_tier.WorkerTier.before_model = corrupted


def _record_hostcache_log() -> list[str]:
    """The tier's log lines of this process, as said."""
    import logging

    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    logging.getLogger("lmdeploy_hostcache").addHandler(Keep())
    return said


async def balance_when_idle(scheduler, timeout: float = 60.0) -> list[str]:
    """Once the scheduler has nothing left: tests/balance.py's problems (none when balanced)."""
    from balance import balance_problems
    from lmdeploy_patch.scheduler_tier import tier_of

    deadline = time.monotonic() + timeout
    while scheduler.has_unfinished() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if scheduler.has_unfinished():
        return [f"scheduler still has unfinished sequences after {timeout} s"]
    return balance_problems(scheduler, tier_of(scheduler))


def engine_config(args: argparse.Namespace):
    from lmdeploy import PytorchEngineConfig

    extra = {}
    if args.host_cache_ratio > 0:
        extra = dict(host_cache_ratio=args.host_cache_ratio, host_cache_write_policy=args.write_policy,
                     host_cache_verify=args.verify)
        if args.host_cache_store:
            extra["host_cache_store"] = args.host_cache_store
    return PytorchEngineConfig(session_len=4096, max_batch_size=8, block_size=args.block_size,
                               num_gpu_blocks=args.gpu_blocks,
                               enable_prefix_caching=True, quant_policy=args.quant_policy, eager_mode=args.eager,
                               **extra)


def run(args: argparse.Namespace) -> tuple[dict, object]:
    t0 = time.perf_counter()
    from transformers import AutoTokenizer

    import lmdeploy
    from lmdeploy import GenerationConfig, pipeline

    if args.fault == "corrupt-restores":
        corrupt_restores()
    if args.faults:  # read by each rank as it builds its pool (lmdeploy_patch/faults.py); the ranks are in this process
        os.environ["HOSTCACHE_FAULTS"] = args.faults
    said = _record_hostcache_log()
    tok = AutoTokenizer.from_pretrained(args.model)
    special = {s: tok.convert_tokens_to_ids(s) for s in tiny_model.SPECIAL}
    plan = make_plan(tiny_model.word_ids(tok), args.sessions, args.plan_turns or args.turns, args.seed,
                     args.max_new_tokens)
    pipe = pipeline(args.model, backend_config=engine_config(args), log_level="WARNING")
    t_built = time.perf_counter()
    engine = pipe.async_engine
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, ignore_eos=True)

    def call(coro):
        return on_engine_loop(pipe, coro, args.request_timeout)

    history: list[list[tuple[list[int], list[int]]]] = [[] for _ in range(args.sessions)]
    turns = []
    for t in range(args.turns):
        prompts = [prompt_ids(special, plan, history[s], plan["users"][s][t]) for s in range(args.sessions)]
        if args.concurrent:
            async def wave():
                return await asyncio.gather(*(_generate(engine, ids, gen) for ids in prompts))

            results = call(wave())
        else:
            results = []
            for ids in prompts:
                results.append(call(_generate(engine, ids, gen)))
                for when, sig, pid in args.signal:  # test-only: a store process dies or hangs mid-run
                    if len(turns) + len(results) == when:
                        os.kill(pid, sig)
        for s, (ids, r) in enumerate(zip(prompts, results)):
            reply = plan["replies"][s][t] if args.fixed_replies else r["tokens"]
            history[s].append((plan["users"][s][t], reply))
            turns.append({"session": s, "turn": t, "input_len": len(ids), **r})
    t_done = time.perf_counter()
    # The API server's path (AsyncEngine -> Engine.get_schedule_metrics), on the engine's loop.
    metrics = _metrics(call(engine.get_schedule_metrics()))
    problems = call(balance_when_idle(engine.engine.scheduler)) if args.balance else None
    try:
        import lmdeploy_patch

        patch = lmdeploy_patch.status()
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        patch = {"error": repr(e)}
    result = {
        "config": {k: getattr(args, k) for k in ("quant_policy", "gpu_blocks", "host_cache_ratio", "write_policy",
                                                 "sessions", "turns", "max_new_tokens", "eager", "concurrent",
                                                 "fault", "fixed_replies", "faults", "verify", "block_size",
                                                 "host_cache_store")},
        "lmdeploy": lmdeploy.__version__, "patch": patch, "metrics": metrics, "turns": turns,
        "balance_problems": problems, "hostcache_log": said,
        "seconds": {"import_and_build": round(t_built - t0, 2), "requests": round(t_done - t_built, 2)},
    }
    return result, pipe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--quant-policy", type=int, default=0)
    p.add_argument("--gpu-blocks", type=int, default=32)
    p.add_argument("--host-cache-ratio", type=float, default=0.0, help="0: tier off (the field is not even passed)")
    p.add_argument("--write-policy", default="write_through")
    p.add_argument("--sessions", type=int, default=6)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--eager", action="store_true", help="eager_mode=True (no CUDA graphs)")
    p.add_argument("--concurrent", action="store_true", help="a turn's requests of all sessions in flight together")
    p.add_argument("--fault", choices=["corrupt-restores"], default=None, help="test-only fault (negative control)")
    p.add_argument("--faults", default="", help="test-only injected faults (HOSTCACHE_FAULTS, lmdeploy_patch/faults.py)")
    p.add_argument("--verify", action="store_true", help="host_cache_verify=True")
    p.add_argument("--balance", action="store_true", help="check allocator and host-slot balance at the end")
    p.add_argument("--fixed-replies", action="store_true",
                   help="resend the plan's fixed replies, not the generated ones: the prompts then do not depend on "
                        "what was generated (GPU runs whose numerics depend on the batch)")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--plan-turns", type=int, default=0,
                   help="draw the plan for this many turns (default: --turns) and run the first --turns of it")
    p.add_argument("--host-cache-store", default=None, help="host_cache_store: a Mooncake config file")
    p.add_argument("--signal", action="append", default=[], type=_signal_spec, metavar="N:SIG:PID",
                   help="test-only: after request N send SIG (KILL, STOP, CONT) to PID (a store process)")
    args = p.parse_args(argv)
    run_and_exit(run, args, lambda result: {k: result[k] for k in ("config", "metrics", "seconds")})


def _signal_spec(text: str) -> tuple[int, int, int]:
    when, sig, pid = text.split(":")
    return int(when), int(getattr(signal, "SIG" + sig)), int(pid)


def run_and_exit(run, args: argparse.Namespace, summary) -> None:
    """run(args) -> (result, pipeline): the result written to args.out, its
    summary printed, the process gone (a traceback and exit 1 if run failed)."""
    try:
        result, pipe = run(args)
    except BaseException:  # engine threads may be alive: leave at once, with the traceback
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    write_json(args.out, result)
    print(json.dumps(summary(result)), flush=True)
    close_and_exit(pipe)


def write_json(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    os.replace(tmp, path)


def close_and_exit(pipe) -> None:
    """Results are written: a close that hangs must not hold the test up."""
    threading.Timer(30.0, lambda: os._exit(0)).start()
    try:
        pipe.close()
    finally:
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
