"""One LMDeploy pipeline (PyTorch engine, in this process) sending one
prompt under several cache salts, with other prompts in between that push
it out of the GPU cache; writes what each request was served as JSON.

    python tests/engine/salts.py --model DIR --out FILE.json [--gpu-blocks 32] [--host-cache-ratio 8]

Used by test_engine_salt.py. The order: the prompt under salt a, a again,
b, no salt, no salt again; then ten other prompts (unsalted), more than the
GPU cache holds; then the prompt under c (never sent before), b, and a.
After each of the last three, the host tier's hit tokens are read.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import tiny_model  # noqa: E402
from turns import _generate, _metrics, make_plan, on_engine_loop, prompt_ids, run_and_exit  # noqa: E402

ORDER = ["a", "a", "b", None, None] + ["flood"] * 10 + ["c", "b", "a"]


def run(args: argparse.Namespace) -> tuple[dict, object]:
    from transformers import AutoTokenizer

    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline

    tok = AutoTokenizer.from_pretrained(args.model)
    special = {s: tok.convert_tokens_to_ids(s) for s in tiny_model.SPECIAL}
    plan = make_plan(tiny_model.word_ids(tok), sessions=11, turns=1, seed=77)
    extra = dict(host_cache_ratio=args.host_cache_ratio) if args.host_cache_ratio > 0 else {}
    config = PytorchEngineConfig(session_len=4096, max_batch_size=8, block_size=64, num_gpu_blocks=args.gpu_blocks,
                                 enable_prefix_caching=True, eager_mode=True, **extra)
    pipe = pipeline(args.model, backend_config=config, log_level="WARNING")
    engine = pipe.async_engine
    prompts = [prompt_ids(special, plan, [], plan["users"][s][0]) for s in range(11)]
    requests, flood = [], 1
    for salt in ORDER:
        ids = prompts[0]
        if salt == "flood":
            ids, salt, flood = prompts[flood], None, flood + 1
        gen = GenerationConfig(max_new_tokens=8, do_sample=False, ignore_eos=True, cache_salt=salt)
        r = on_engine_loop(pipe, _generate(engine, ids, gen), 120)
        host = _metrics(on_engine_loop(pipe, engine.get_schedule_metrics(), 60))["host_cache"] or {}
        requests.append({"salt": salt, "prompt": 0 if ids is prompts[0] else flood - 1, "input_len": len(ids),
                         "host_hit_tokens": host.get("host_hit_tokens"), **r})
    return {"requests": requests, "gpu_blocks": args.gpu_blocks, "host_cache_ratio": args.host_cache_ratio}, pipe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--gpu-blocks", type=int, default=32)
    p.add_argument("--host-cache-ratio", type=float, default=0.0)
    args = p.parse_args(argv)
    run_and_exit(run, args, lambda result: [(r["salt"], r["cached_tokens"], r["host_hit_tokens"])
                                            for r in result["requests"]])

if __name__ == "__main__":
    sys.exit(main())
