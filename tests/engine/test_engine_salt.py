"""cache_salt through LMDeploy 0.18.0's real engine (salts.py, one process
per configuration): one prompt under salts a, a, b, none, none; ten other
prompts that push it out of a 32-block GPU cache; then c, b, a.

  gpu  : tier off, 256 GPU blocks (nothing is evicted): the GPU prefix trie alone;
  host : tier on, 32 GPU blocks, host pool 8x: after the flood only host memory holds the prompt.

Requests of one salt (or of none) share the prompt's blocks; requests of
different salts never do, in the GPU trie or in host memory: the first
request of a namespace computes the whole prompt (cached_tokens 0, so its
time to first token says nothing about another namespace), the host tier
serves it nothing, and the greedy tokens are the same under every salt.
"""
from __future__ import annotations

import pytest

from conftest import EngineRuns, engine_env, get

BLOCK = 64


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict:
    base = ["tests/engine/salts.py", "--model", tiny_model_dir]
    jobs = {"gpu": base + ["--gpu-blocks", "256"], "host": base + ["--gpu-blocks", "32", "--host-cache-ratio", "8"]}
    return EngineRuns(tmp_path_factory.mktemp("engine-salt"), 2, timeout=300).run(jobs, engine_env())


def _prompt_requests(run: dict) -> list[dict]:
    return [r for r in run["requests"] if r["prompt"] == 0]


@pytest.mark.parametrize("name", ["gpu", "host"])
def test_one_namespace_shares_and_another_computes_everything(runs, name):
    reqs = _prompt_requests(get(runs, name))
    full = (reqs[0]["input_len"] - 1) // BLOCK * BLOCK
    cached = [(r["salt"], r["cached_tokens"]) for r in reqs]
    assert cached[:5] == [("a", 0), ("a", full), ("b", 0), (None, 0), (None, full)], cached
    assert cached[5] == ("c", 0), cached  # never sent under c: nothing, though a, b and none hold it
    assert cached[6:] == [("b", full), ("a", full)], cached
    assert len({tuple(r["tokens"]) for r in reqs}) == 1  # the salt changes what is cached, never the tokens


def test_the_host_tier_keeps_namespaces_apart(runs):
    reqs = _prompt_requests(get(runs, "host"))
    c, b, a = reqs[5:]
    before_c = [r for r in get(runs, "host")["requests"] if r["prompt"] != 0][-1]["host_hit_tokens"]
    assert c["host_hit_tokens"] == before_c, (before_c, c)  # c found nothing in host memory
    # after the flood the 32-block GPU cache lost the prompt: b and a come back from host memory
    assert b["host_hit_tokens"] - c["host_hit_tokens"] > 0 and a["host_hit_tokens"] - b["host_hit_tokens"] > 0
