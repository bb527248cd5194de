"""The CPU-engine shim is test support: loaded only by its switch, refusing
what it does not implement with one line, unknown to the product."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, SITE_DIR, engine_env


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=engine_env(**env), cwd=str(REPO))


def test_the_shim_refuses_other_lmdeploy_versions():
    r = _python("import importlib.metadata as m; m.version = lambda name: '0.17.1'\n"
                "import lmdeploy_on_cpu; lmdeploy_on_cpu.install_from_site()",
                HOSTCACHE_TEST_LMDEPLOY_ON_CPU="0")
    assert r.returncode == 3, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "written for LMDeploy 0.18.0, found 0.17.1" in lines[0], r.stderr


@pytest.mark.parametrize("field, value, what", [
    ("sliding_window", 128, "sliding-window"), ("alibi", True, "alibi"), ("logit_softcapping", 30.0, "softcapping"),
    ("use_flash_mla", True, "MLA"), ("mla_index_topk", 2048, "MLA"), ("learnable_sink", True, "learnable sinks"),
    ("block_sparse_size", 4, "block-sparse")])
def test_the_shim_refuses_attention_it_does_not_implement(engine_mode, field, value, what):
    if engine_mode != "cpu":
        pytest.skip("the shim is loaded in CPU mode only")
    spec = dict(num_heads=4, head_dim=64, scale=None, num_kv_heads=2, v_head_dim=64, alibi=False, sliding_window=None,
                logit_softcapping=0.0, causal=True, use_flash_mla=False, mla_index_topk=None, learnable_sink=False,
                block_sparse_size=1)
    spec[field] = value
    r = _python("from lmdeploy.pytorch.backends import get_backend\n"
                "from lmdeploy.pytorch.backends.attention import PagedAttentionBuildSpec\n"
                f"get_backend().build_op(PagedAttentionBuildSpec(**{spec!r}))")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lmdeploy_on_cpu.ShimRefused: lmdeploy_on_cpu (test support): ") and what in last, last


@pytest.mark.parametrize("policy", [16, 17, 42])
def test_the_shim_refuses_fp8_and_turboquant_kv(engine_mode, policy):
    if engine_mode != "cpu":
        pytest.skip("the shim is loaded in CPU mode only")
    r = _python("from types import SimpleNamespace\n"
                "from lmdeploy.pytorch.backends import get_backend\n"
                f"get_backend().update_step_context(SimpleNamespace(kv_quant_policy={policy}))")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "ShimRefused" in last and f"KV quant policy {policy}" in last, last


def test_the_shim_stays_out_of_processes_without_its_switch():
    r = _python("import sys, torch; print('lmdeploy_on_cpu' in sys.modules, torch.cuda.Stream.__module__)",
                HOSTCACHE_TEST_LMDEPLOY_ON_CPU="0")
    assert r.returncode == 0, r.stderr[-2000:]
    loaded, stream_module = r.stdout.split()
    assert loaded == "False" and stream_module.startswith("torch"), r.stdout


def test_engine_processes_evict_in_a_reproducible_order():
    # Every engine process (GPU runs too) counts accesses instead of whole seconds:
    # tests/engine/site/lmdeploy_logical_lru.py says why; without it the salt test fails at random.
    code = ("import lmdeploy.pytorch.paging.block_manager.base_block_manager as b; "
            "t = b.time.perf_counter; print(type(b.time).__name__, t() < t())")
    on, off = _python(code), _python(code, HOSTCACHE_TEST_LOGICAL_LRU="0")
    assert on.returncode == 0 and off.returncode == 0, (on.stderr[-2000:], off.stderr[-2000:])
    assert on.stdout.split() == ["LogicalClock", "True"], on.stdout
    assert off.stdout.split()[0] == "module", off.stdout  # the switch alone turns it on


def test_the_product_does_not_know_the_shim():
    for folder in ("lmdeploy_patch", "python", "src"):
        hits = subprocess.run(["grep", "-rlE", "lmdeploy_on_cpu|HOSTCACHE_TEST_|lmdeploy_start_race|lmdeploy_logical_lru", folder],
                              capture_output=True, text=True, cwd=str(REPO)).stdout.split()
        assert not hits, f"{folder}/ refers to test support: {hits}"
    # Nothing from tests/ is packaged: the wheel holds the product's two packages only.
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["scikit-build"]["wheel"]["packages"]
    assert packages == ["python/lmdeploy_hostcache", "lmdeploy_patch"], packages
    assert SITE_DIR.is_relative_to(REPO / "tests")
