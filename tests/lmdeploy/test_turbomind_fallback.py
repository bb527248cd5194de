"""A TurboMind request for the host tier is served by the PyTorch engine, with
one warning; without the tier, LMDeploy's choice is unchanged."""
import pytest

pytest.importorskip("lmdeploy")

import dataclasses  # noqa: E402
import sys  # noqa: E402

from lmdeploy import PytorchEngineConfig, TurbomindEngineConfig  # noqa: E402

from lmdeploy_patch.settings import HOST_CACHE_FIELDS  # noqa: E402
from lmdeploy_patch.turbomind_fallback import turbomind_to_pytorch  # noqa: E402

archs = sys.modules["lmdeploy.archs"]
pipeline_module = sys.modules["lmdeploy.pipeline"]


def tm_config(**kwargs):
    base = dict(tp=1, session_len=8192, max_batch_size=16, cache_max_entry_count=0.5, cache_block_seq_len=128,
                enable_prefix_caching=True, quant_policy=4, max_prefill_token_num=4096)
    return TurbomindEngineConfig(**{**base, **kwargs})


def without_ours(cfg):
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in HOST_CACHE_FIELDS}


@pytest.fixture
def backend_is(monkeypatch):
    def choose(backend):
        monkeypatch.setattr(archs, "autoget_backend", lambda *a, **k: backend)

    return choose


def test_pipeline_binds_the_wrapper():
    assert pipeline_module.autoget_backend_config is archs.autoget_backend_config
    assert hasattr(archs.autoget_backend_config, "__wrapped__")


@pytest.mark.parametrize("chosen", ["turbomind", "pytorch"])
def test_tier_on_turbomind_config_goes_to_pytorch_once(backend_is, hostcache_log, chosen):
    backend_is(chosen)
    backend, config = archs.autoget_backend_config("model", tm_config(host_cache_ratio=2.0,
                                                                      host_cache_write_policy="write_back"))
    assert backend == "pytorch" and type(config) is PytorchEngineConfig
    assert config.host_cache_ratio == 2.0 and config.host_cache_write_policy == "write_back"
    assert config.block_size == 128 and config.quant_policy == 4 and config.session_len == 8192
    log = hostcache_log()
    assert len(log) == 1 and "TurboMind cannot host" in log[0] and "KV-cache hooks" in log[0]


def test_conversion_equals_lmdeploys_own(backend_is):
    # LMDeploy's own TurboMind->PyTorch conversion (what it does when
    # autoget_backend says 'pytorch') gives the same config as ours.
    backend_is("pytorch")
    original = archs.autoget_backend_config.__wrapped__
    for cfg in (tm_config(host_cache_ratio=3.0), tm_config(host_cache_size=0.5),
                tm_config(host_cache_ratio=1.0, host_cache_write_policy="write_through_selective")):
        _, theirs = original("model", cfg)
        ours = turbomind_to_pytorch(cfg)
        assert dataclasses.asdict(ours) == dataclasses.asdict(theirs)


def test_size_only_and_zero_ratio_carried():
    config = turbomind_to_pytorch(tm_config(host_cache_size=0.5))
    assert config.host_cache_size == 0.5 and config.host_cache_ratio == 0.0


@pytest.mark.parametrize("chosen", ["turbomind", "pytorch"])
def test_tier_off_result_equals_unpatched(backend_is, hostcache_log, chosen):
    backend_is(chosen)
    original = archs.autoget_backend_config.__wrapped__
    for cfg in (None, tm_config(), tm_config(host_cache_write_policy="write_back")):
        backend, config = archs.autoget_backend_config("model", cfg)
        backend0, config0 = original("model", cfg)
        assert backend == backend0 == chosen
        assert type(config) is type(config0)
        assert without_ours(config) == without_ours(config0)
        assert config.host_cache_ratio == 0.0 and config.host_cache_size is None
        assert config.host_cache_write_policy == getattr(cfg, "host_cache_write_policy", "write_through")
    assert hostcache_log() == []


def test_pytorch_config_passes_through(hostcache_log):
    cfg = PytorchEngineConfig(host_cache_ratio=1.0)
    assert archs.autoget_backend_config("model", cfg) == ("pytorch", cfg)
    assert archs.autoget_backend_config("model", cfg)[1] is cfg
    assert hostcache_log() == []


# --------------------------------------------------------------------------
# programmatic serve()
# --------------------------------------------------------------------------

class _Stop(Exception):
    pass


@pytest.fixture
def serve_reaches_get_task(monkeypatch):
    """serve() calls get_task(backend, model_path, ..., backend_config=...) right
    after its setup; recording there shows what LMDeploy would build. Give it
    an existing model folder: a hub id makes its setup look the model up online."""
    api_server = pytest.importorskip("lmdeploy.serve.openai.api_server")
    calls = []

    def get_task(backend, model_path, trust_remote_code=False, backend_config=None):
        calls.append((backend, backend_config))
        raise _Stop

    monkeypatch.setattr(api_server, "get_task", get_task)
    return api_server, calls


def test_serve_turbomind_with_tier_runs_pytorch(serve_reaches_get_task, hostcache_log, tmp_path):
    api_server, calls = serve_reaches_get_task
    with pytest.raises(_Stop):
        api_server.serve(str(tmp_path), backend="turbomind", backend_config=tm_config(host_cache_ratio=2.0))
    with pytest.raises(_Stop):
        api_server.serve(str(tmp_path), None, "turbomind", tm_config(host_cache_size=0.25))  # positionally
    (b1, c1), (b2, c2) = calls
    assert b1 == b2 == "pytorch"
    assert type(c1) is type(c2) is PytorchEngineConfig
    assert c1.host_cache_ratio == 2.0 and c1.quant_policy == 4 and c1.block_size == 128
    assert c2.host_cache_size == 0.25
    assert len(hostcache_log()) == 2  # one line per fallback


def test_serve_default_backend_with_pytorch_config_with_tier(serve_reaches_get_task, hostcache_log, tmp_path):
    api_server, calls = serve_reaches_get_task
    cfg = PytorchEngineConfig(host_cache_ratio=1.0)
    with pytest.raises(_Stop):
        api_server.serve(str(tmp_path), backend_config=cfg)  # backend defaults to 'turbomind'
    assert calls == [("pytorch", cfg)]
    assert len(hostcache_log()) == 1


def test_serve_without_tier_unchanged(serve_reaches_get_task, hostcache_log, tmp_path):
    api_server, calls = serve_reaches_get_task
    cfg = tm_config()
    with pytest.raises(_Stop):
        api_server.serve(str(tmp_path), backend="turbomind", backend_config=cfg)
    assert calls == [("turbomind", cfg)] and calls[0][1] is cfg
    assert hostcache_log() == []


def test_launch_server_uses_the_wrapped_serve():
    # dp > 1: launch_server's processes call `serve` bound by name at import
    launch = pytest.importorskip("lmdeploy.serve.openai.launch_server")
    assert launch.serve is sys.modules["lmdeploy.serve.openai.api_server"].serve
    assert hasattr(launch.serve, "__wrapped__")
