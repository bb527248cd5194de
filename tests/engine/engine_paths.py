"""LMDeploy's real engine off the happy path, with the host tier on, in one
process; writes what happened as JSON for test_engine_paths.py.

    python tests/engine/engine_paths.py --model DIR --out FILE.json

In order, in this one process:

  ref      tier off, a GPU cache that never evicts: every conversation below,
           for the reference tokens; then closed;
  engine 1 tier on, a GPU cache so small that decoding sequences are
           preempted (their blocks freed, their prompt recomputed later):
           preempt  : conversations of long replies, all in flight together;
           cancel   : streams cancelled after a few tokens, mid-decode;
           sleep    : sleep(1) then wakeup (KV pools released and rebuilt);
           after    : a conversation after all of that;
           then closed;
  engine 2 a second tier-on engine in the same process: conversations again.

Each phase with conversations runs 4 of them, 2 turns each, every
conversation's turn in flight together, on a 16-block GPU cache: later
turns find their prefixes evicted, so every phase restores from host memory
(after sleep into the rebuilt pools, and in the second engine into its own).

After each phase, once the engine is idle, the allocator and the host tier
are checked for balance (tests/balance.py). Preemptions are counted by
wrapping Scheduler.preempt_seqs (test instrumentation only).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import tiny_model  # noqa: E402
from turns import _generate, balance_when_idle, close_and_exit, make_plan, on_engine_loop, prompt_ids, write_json  # noqa: E402,E501

PREEMPTIONS = {"count": 0}


def count_preemptions() -> None:
    from lmdeploy.pytorch.paging import scheduler

    preempt = scheduler.Scheduler.preempt_seqs

    def counted(self, seqs):
        seqs = list(seqs)
        PREEMPTIONS["count"] += len(seqs)
        return preempt(self, seqs)

    scheduler.Scheduler.preempt_seqs = counted


class Runner:
    """One pipeline and the helpers to drive it from this (main) thread."""

    def __init__(self, model: str, tier: bool, gpu_blocks: int, eager: bool):
        from lmdeploy import PytorchEngineConfig, pipeline
        from transformers import AutoTokenizer

        extra = dict(host_cache_ratio=16.0) if tier else {}
        cfg = PytorchEngineConfig(session_len=4096, max_batch_size=8, block_size=64, num_gpu_blocks=gpu_blocks,
                                  enable_prefix_caching=True, eager_mode=eager, **extra)
        self.tok = AutoTokenizer.from_pretrained(model)
        self.special = {s: self.tok.convert_tokens_to_ids(s) for s in tiny_model.SPECIAL}
        self.pipe = pipeline(model, backend_config=cfg, log_level="WARNING")
        self.engine = self.pipe.async_engine

    def call(self, coro, timeout: float = 300.0):
        return on_engine_loop(self.pipe, coro, timeout)

    def chat(self, plan: dict, new_tokens: int) -> list[dict]:
        """The plan's conversations turn by turn, every conversation's turn in flight together."""
        from lmdeploy import GenerationConfig

        gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, ignore_eos=True)
        users = plan["users"]
        history: list[list] = [[] for _ in users]
        out = []
        for t in range(len(users[0])):
            prompts = [prompt_ids(self.special, plan, history[c], users[c][t]) for c in range(len(users))]

            async def wave():
                return await asyncio.gather(*(_generate(self.engine, ids, gen) for ids in prompts))

            for c, r in enumerate(self.call(wave())):
                history[c].append((users[c][t], r["tokens"]))
                out.append({"conversation": c, "turn": t, "input_len": len(prompts[c]), **r})
        return out

    def cancel_mid_stream(self, prompts: list[list[int]], after: int) -> list[int]:
        """Streams every prompt at once and closes each after `after` tokens."""
        from lmdeploy import GenerationConfig

        gen = GenerationConfig(max_new_tokens=200, do_sample=False, ignore_eos=True)

        async def one(ids):
            session = self.engine.session_mgr.get()
            req = await self.engine.preprocess(messages=None, session_id=session, gen_config=gen, input_ids=ids)
            agen = self.engine.generate(req, stream_response=True)
            got = 0
            try:
                async for out in agen:
                    got += len(out.token_ids or [])
                    if got >= after:
                        break
            finally:
                await agen.aclose()
            return got

        async def all_():
            return await asyncio.gather(*(one(p) for p in prompts))

        return self.call(all_())

    def balance(self, timeout: float = 60.0) -> list[str]:
        """Waits until the scheduler has nothing left, then checks balance on the engine's loop."""
        return self.call(balance_when_idle(self.engine.engine.scheduler, timeout))

    def host_metrics(self) -> dict:
        m = self.call(self.engine.get_schedule_metrics())
        return dict(getattr(m, "host_cache", None) or {})

    def close(self) -> None:
        self.pipe.close()


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    count_preemptions()
    tok = AutoTokenizer.from_pretrained(args.model)
    words = tiny_model.word_ids(tok)
    preempt_plan, after_plan, second_plan = (make_plan(words, 4, 2, seed) for seed in (7, 8, 9))
    cancel_plan = make_plan(words, 2, 1, 10)
    eager = not args.graphs
    result: dict = {"phases": {}}

    ref = Runner(args.model, tier=False, gpu_blocks=512, eager=eager)
    result["ref"] = {"preempt": ref.chat(preempt_plan, args.long_reply), "after": ref.chat(after_plan, 16),
                     "second": ref.chat(second_plan, 16)}
    ref.close()

    one = Runner(args.model, tier=True, gpu_blocks=args.small_blocks, eager=eager)
    p0 = PREEMPTIONS["count"]
    turns = one.chat(preempt_plan, args.long_reply)
    result["phases"]["preempt"] = {"turns": turns, "preemptions": PREEMPTIONS["count"] - p0,
                                   "problems": one.balance(), "host": one.host_metrics()}
    prompts = [prompt_ids(one.special, cancel_plan, [], u[0]) for u in cancel_plan["users"]]
    got = one.cancel_mid_stream(prompts, after=4)
    result["phases"]["cancel"] = {"tokens_before_cancel": got, "problems": one.balance()}
    one.call(one.engine.sleep(1))
    one.engine.wakeup()
    result["phases"]["sleep"] = {"problems": one.balance(), "host": one.host_metrics()}
    turns = one.chat(after_plan, 16)
    result["phases"]["after"] = {"turns": turns, "problems": one.balance(), "host": one.host_metrics()}
    one.close()

    two = Runner(args.model, tier=True, gpu_blocks=args.small_blocks, eager=eager)
    turns = two.chat(second_plan, 16)
    from lmdeploy_patch.rank_tier import local_workers

    result["phases"]["second"] = {"turns": turns, "problems": two.balance(), "host": two.host_metrics(),
                                  "rank_stores_alive": len(local_workers())}
    result["_pipe"] = two
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--small-blocks", type=int, default=16, help="GPU blocks of the tier-on engines")
    p.add_argument("--long-reply", type=int, default=96, help="new tokens per turn in the preemption phase")
    p.add_argument("--graphs", action="store_true", help="eager_mode=False (CUDA graphs; GPU only)")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except BaseException:  # engine threads may be alive: leave at once, with the traceback
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    runner = result.pop("_pipe")
    write_json(args.out, result)
    close_and_exit(runner.pipe)


if __name__ == "__main__":
    sys.exit(main())
