"""The replay may model the store (benchmark/store_model.py) only because
its hits equal a real store's: model_check.py runs one small routed
workload both ways, and every turn must be served alike, GPU, host, store
and recomputed tokens, on each engine. The real run also checks every
byte its forwards read (benchmark/sim_engine.py): a block fetched from the
store with other bytes than were saved fails it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from procs import in_private_netns

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def check(store_usable, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("model-check") / "check.json"
    cmd = ["unshare", "--pid", "--fork", "--kill-child",
           *in_private_netns([sys.executable, str(HERE / "model_check.py"), "--out", str(out)])[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_model_store_serves_every_turn_as_the_real_one(check):
    real, model = check["real"], check["model"]
    assert real["total"]["store"] > 0, real["total"]  # the workload reaches the store at all
    assert real["total"]["host"] > 0 and real["total"]["recomputed"] > 0, real["total"]
    assert model["per_turn"] == real["per_turn"]
    assert check["model_small"]["per_turn"] != real["per_turn"]  # the comparison can fail
    for r, m in zip(real["engines"], model["engines"]):
        assert {k: r[k] for k in ("gpu", "host", "store", "recomputed")} == \
            {k: m[k] for k in ("gpu", "host", "store", "recomputed")}


def test_a_full_store_costs_recomputes_not_bytes(check):
    """The real run again against a 16 MB storage node, written more than it
    holds: Mooncake evicts (and refuses puts while it does, counted in
    failures_full when it happens), fewer turns are served from the store,
    and every byte the forwards read is still right (the run completed)."""
    full, real = check["full"], check["real"]
    written = sum(m["host_store_bytes_written"] for m in full["store_metrics"])
    assert written > 16 << 20, full["store_metrics"]  # more than the node holds
    assert full["total"]["store"] < real["total"]["store"], (full["total"], real["total"])
    assert full["total"]["prompt"] == real["total"]["prompt"]
