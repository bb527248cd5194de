"""LMDeploy's real engine (tests/engine/turns.py, one process per engine)
with a real Mooncake Store behind its host pool (cluster.py); writes each
engine's results as JSON into one file. Run inside a private network and
PID namespace (test_engine_store.py does), with the engine environment
(tests/engine/conftest.engine_env).

    python tests/store/engines.py --model DIR --out FILE.json

The engines, in order (each a fresh process, GPU cache 32 blocks, host
pool 8x, so nothing but the store carries KV from one to the next):

  ref   : tier off, 256 GPU blocks (never evicts), sessions x 3 turns;
  a     : tier and store on, the first 2 turns;
  b     : the same engine started again from scratch, all 3 turns: turns
          1-2 again (what `a` computed, from the store) and turn 3, which
          continues conversations served before the restart;
  quant : as `b` but quant_policy 4 (int4 KV): other keys, no hit;
  block : as `b` but 32-token blocks: other keys, no hit;
  config: as `b`, the same model (its name, weights, every shape) but one
          config value that changes nothing it computes (initializer_range):
          only the config digest in the keys tells the engines apart;
  stalled     : as `b` (a 1 s budget), but the storage node is stopped
                after its first request and resumed after its second: fetches
                outlast their budget, then the node answers again;
  unreachable : as `b`, with a config whose master nobody listens on;
  node        : as `b`, but the storage node is killed after its first
                request: fetches fail, the engine recomputes;
  hung        : as `b` (a 1 s budget, the node dead), but the master is
                stopped after its first request and never resumed (until
                the engine exited): every call hangs; it must still serve,
                and exit in bounded time.

Each result also says how long its process took to exit after writing it
(`exit_s`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(HERE)]

from cluster import Cluster, free_port  # noqa: E402

SESSIONS = 4


def turns_argv(model: str, out: Path, turns: int, store: Path | None, blocks: int = 32, quant: int = 0,
               block_size: int = 64, signals: tuple[str, ...] = (), balance: bool = True) -> list[str]:
    argv = [sys.executable, str(REPO / "tests" / "engine" / "turns.py"), "--model", model, "--out", str(out),
            "--gpu-blocks", str(blocks), "--turns", str(turns), "--plan-turns", "3", "--sessions", str(SESSIONS),
            "--eager", "--quant-policy", str(quant), "--block-size", str(block_size)] + ["--balance"] * balance
    if store is not None:
        argv += ["--host-cache-ratio", "8", "--host-cache-store", str(store)]
    for spec in signals:
        argv += ["--signal", spec]
    return argv


def run_all(jobs: dict[str, list[str]], logs: Path, timeout: float) -> dict:
    """Starts every job at once, waits for all: name -> result or the error."""
    procs = {name: subprocess.Popen(argv, stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT)
             for name, argv in jobs.items()}
    results = {}
    deadline = time.monotonic() + timeout
    exited: dict[str, float] = {}
    while len(exited) < len(procs) and time.monotonic() < deadline:
        for name, proc in procs.items():
            if name not in exited and proc.poll() is not None:
                exited[name] = time.time()
        time.sleep(0.05)
    for name, proc in procs.items():
        if name not in exited:
            proc.kill()
        rc = proc.wait() if name in exited else "timeout"
        out = logs / f"{name}.json"
        if rc == 0 and out.exists():
            results[name] = {**json.loads(out.read_text()), "exit_s": exited[name] - out.stat().st_mtime}
        else:
            results[name] = f"{name} failed ({rc}): " + (logs / f"{name}.log").read_text()[-4000:]
    return results


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    logs = Path(args.out).parent / "store-engines"
    logs.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(logs)
    try:
        config = cluster.config(logs / "mooncake.json", lookup_budget_ms=10_000)  # two CPU engines share 2 cores
        m = args.model
        results = run_all({"ref": turns_argv(m, logs / "ref.json", 3, None, blocks=256),
                           "a": turns_argv(m, logs / "a.json", 2, config)}, logs, args.timeout)
        variant = logs / "config-variant" / Path(m).name  # the same name
        shutil.copytree(m, variant, dirs_exist_ok=True)
        cfg = json.loads((variant / "config.json").read_text())
        cfg["initializer_range"] = cfg.get("initializer_range", 0.02) * 2
        (variant / "config.json").write_text(json.dumps(cfg))
        results.update(run_all({"b": turns_argv(m, logs / "b.json", 3, config),
                                "quant": turns_argv(m, logs / "quant.json", 2, config, quant=4),
                                "config": turns_argv(str(variant), logs / "config.json", 2, config)},
                               logs, args.timeout))
        short = cluster.config(logs / "mooncake-1s.json", lookup_budget_ms=1000)
        node, master = cluster.node_proc.pid, cluster.procs[0].pid
        results.update(run_all({"block": turns_argv(m, logs / "block.json", 2, config, block_size=32),
                                "stalled": turns_argv(m, logs / "stalled.json", 3, short,
                                                      signals=(f"1:STOP:{node}", f"2:CONT:{node}"))},
                               logs, args.timeout))
        dead = logs / "mooncake-dead.json"
        dead.write_text(json.dumps({**json.loads(config.read_text()), "master_server_address": f"127.0.0.1:{free_port()}"}))
        results.update(run_all({"unreachable": turns_argv(m, logs / "unreachable.json", 3, dead),
                                "node": turns_argv(m, logs / "node.json", 3, config, signals=(f"1:KILL:{node}",))},
                               logs, args.timeout))
        # Last: a master stopped for long loses its clients' leases (the node's objects).
        results.update(run_all({"hung": turns_argv(m, logs / "hung.json", 3, short, balance=False,
                                                   signals=(f"1:STOP:{master}",))}, logs, args.timeout))
        os.kill(master, signal.SIGCONT)
        results["node_killed"] = cluster.node_proc.poll() is not None
    finally:
        cluster.stop()
    Path(args.out).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
