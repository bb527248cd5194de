"""--host-cache* flags on `lmdeploy serve api_server` and `lmdeploy chat`,
parsed with LMDeploy's real parsers, and the configs they produce."""
import pytest

pytest.importorskip("lmdeploy")

import sys  # noqa: E402

from lmdeploy import PytorchEngineConfig, TurbomindEngineConfig  # noqa: E402
from lmdeploy.messages import QuantPolicy  # noqa: E402

from lmdeploy_patch.cli_flags import TURBOMIND_FLAG_ERROR  # noqa: E402
from lmdeploy_patch.settings import DEFAULT_HOST_CACHE_RATIO, HOST_CACHE_FIELDS  # noqa: E402

FLAGS = ["--host-cache", "--host-cache-ratio", "--host-cache-size", "--host-cache-write-policy",
         "--host-cache-restore-policy", "--host-cache-verify", "--host-cache-store"]


def host_values(ns):
    return {name: getattr(ns, name) for name in HOST_CACHE_FIELDS if hasattr(ns, name)}


@pytest.fixture(params=["serve", "chat"])
def command(request):
    return ["serve", "api_server"] if request.param == "serve" else ["chat"]


def parse(parser, argv):
    return parser.parse_args(argv)


def test_host_cache_switch_sets_default_ratio(cli_parser, command):
    ns = parse(cli_parser, [*command, "model", "--host-cache"])
    assert host_values(ns) == {"host_cache_ratio": DEFAULT_HOST_CACHE_RATIO}
    assert ns.backend == "turbomind"  # LMDeploy's default left as it was


@pytest.mark.parametrize("order", [["--host-cache", "--host-cache-ratio", "2"],
                                   ["--host-cache-ratio", "2", "--host-cache"]])
def test_explicit_ratio_wins_in_any_order(cli_parser, command, order):
    assert parse(cli_parser, [*command, "model", *order]).host_cache_ratio == 2.0


def test_all_flags_with_quant_policy(cli_parser, command):
    ns = parse(cli_parser, [*command, "model", "--host-cache-ratio", "1.5", "--host-cache-size", "0.01",
                            "--host-cache-write-policy", "write_back", "--quant-policy", "4"])
    assert host_values(ns) == {"host_cache_ratio": 1.5, "host_cache_size": 0.01,
                               "host_cache_write_policy": "write_back"}
    assert ns.quant_policy == 4


def test_underscore_spelling_accepted(cli_parser):
    # LMDeploy's FlexibleArgumentParser maps --a_b to --a-b
    assert parse(cli_parser, ["chat", "model", "--host_cache_ratio", "3"]).host_cache_ratio == 3.0


def test_no_flag_leaves_namespace_unchanged(cli_parser, command):
    ns = parse(cli_parser, [*command, "model"])
    assert host_values(ns) == {}
    assert ns.backend == "turbomind" and type(ns.backend) is str


BAD_FLAGS = [
    (["--host-cache-ratio", "-1"], ["--host-cache-ratio", ">= 0"]),
    (["--host-cache-ratio", "nan"], ["--host-cache-ratio", "finite"]),
    (["--host-cache-ratio", "inf"], ["--host-cache-ratio", "finite"]),
    (["--host-cache-ratio", "lots"], ["--host-cache-ratio", "number", "finite number >= 0"]),
    (["--host-cache-size", "0"], ["--host-cache-size", "> 0"]),
    (["--host-cache-size=-inf"], ["--host-cache-size", "finite"]),  # "-inf" alone reads as an option
    (["--host-cache-size", "1e9"], ["--host-cache-size", "does not fit", "GiB available"]),
    (["--host-cache-write-policy", "write_around"], ["--host-cache-write-policy", "invalid choice"]),
    (["--host-cache-restore-policy", "sometimes"], ["--host-cache-restore-policy", "invalid choice", "auto"]),
]


@pytest.mark.parametrize("argv,words", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_values_are_parse_errors(cli_parser, command, capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        parse(cli_parser, [*command, "model", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


@pytest.mark.parametrize("flag", [["--host-cache"], ["--host-cache-ratio", "2"], ["--host-cache-size", "0.01"],
                                  ["--host-cache-write-policy", "write_back"]])
@pytest.mark.parametrize("before", [True, False])
def test_explicit_turbomind_with_host_cache_flag_is_error(cli_parser, command, capsys, flag, before):
    backend = ["--backend", "turbomind"]
    argv = [*command, "model", *(backend + flag if before else flag + backend)]
    with pytest.raises(SystemExit) as info:
        parse(cli_parser, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert TURBOMIND_FLAG_ERROR in err and "--backend pytorch" in err


def test_explicit_turbomind_without_flags_and_pytorch_with_flags_fine(cli_parser, command):
    assert parse(cli_parser, [*command, "model", "--backend", "turbomind"]).backend == "turbomind"
    ns = parse(cli_parser, [*command, "model", "--backend", "pytorch", "--host-cache"])
    assert ns.backend == "pytorch" and ns.host_cache_ratio == DEFAULT_HOST_CACHE_RATIO


def test_chat_help_shows_flags_and_default_ratio(cli_parser, capsys):
    with pytest.raises(SystemExit) as info:
        parse(cli_parser, ["chat", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag in FLAGS:
        assert flag in out
    assert f"default ratio {DEFAULT_HOST_CACHE_RATIO}" in out
    assert "Default: turbomind" in out  # --backend's help still shows its real default


def test_api_server_help_subprocess(runs):
    run = runs.get("api_server_help")
    assert run.returncode == 0, run.stderr
    out = " ".join(run.stdout.split())
    for flag in FLAGS:
        assert flag in out
    assert f"default ratio {DEFAULT_HOST_CACHE_RATIO}" in out
    assert "write_through,write_through_selective,write_back" in out
    assert "auto,always,never" in out


def test_turbomind_explicit_subprocess_exit_2(runs):
    run = runs.get("turbomind_explicit")
    assert run.returncode == 2
    assert "lmdeploy serve api_server: error:" in run.stderr
    assert "TurboMind" in run.stderr and "--backend pytorch" in run.stderr


# --------------------------------------------------------------------------
# api_server: the built config carries the values
# --------------------------------------------------------------------------

class _Captured(Exception):
    pass


@pytest.fixture
def captured_serve(monkeypatch):
    """Replaces the API server's serve() (looked up by name when
    SubCliServe.api_server runs) with a recorder."""
    api_server = pytest.importorskip("lmdeploy.serve.openai.api_server")
    calls = []
    monkeypatch.setattr(api_server, "serve", lambda *a, **k: calls.append((a, k)))
    return calls


@pytest.fixture
def autoget_backend(monkeypatch):
    """What LMDeploy's backend auto-selection returns (turbomind is not built
    on CPU machines, so it would always say 'pytorch')."""
    archs = sys.modules["lmdeploy.archs"]
    asked = []

    def choose(backend):
        def fake(model_path, trust_remote_code=False):
            asked.append(model_path)
            return backend

        monkeypatch.setattr(archs, "autoget_backend", fake)
        return asked

    return choose


def run_api_server(cli_parser, tmp_path, *argv):
    args = cli_parser.parse_args(["serve", "api_server", str(tmp_path), "--max-batch-size", "4", *argv])
    args.run(args)
    return args


def test_api_server_builds_pytorch_config_with_values(cli_parser, tmp_path, captured_serve, autoget_backend,
                                                      hostcache_log):
    asked = autoget_backend("turbomind")
    run_api_server(cli_parser, tmp_path, "--host-cache", "--host-cache-write-policy", "write_through_selective",
                   "--host-cache-restore-policy", "never", "--host-cache-verify", "--quant-policy", "4")
    (args, kwargs), = captured_serve
    config = kwargs["backend_config"]
    assert kwargs["backend"] == "pytorch" and type(config) is PytorchEngineConfig
    assert config.host_cache_ratio == DEFAULT_HOST_CACHE_RATIO
    from lmdeploy_patch.settings import DefaultRatio

    assert isinstance(config.host_cache_ratio, DefaultRatio)  # --host-cache's ratio: shrinks to fit
    assert config.host_cache_write_policy == "write_through_selective"
    assert config.host_cache_restore_policy == "never" and config.host_cache_verify is True
    assert config.host_cache_size is None and config.quant_policy == QuantPolicy.INT4
    assert asked == []  # the tier decided the backend; LMDeploy's auto-selection was not needed
    assert len(hostcache_log()) == 1 and "TurboMind" in hostcache_log()[0]


def test_a_store_flag_brings_the_host_pool_and_reaches_the_config(cli_parser, tmp_path, captured_serve):
    from lmdeploy_patch.settings import DefaultRatio

    store = tmp_path / "mooncake.json"
    store.write_text('{"metadata_server": "P2PHANDSHAKE", "master_server_address": "10.0.0.1:50051"}')
    run_api_server(cli_parser, tmp_path, "--host-cache-store", str(store))
    (args, kwargs), = captured_serve
    config = kwargs["backend_config"]
    assert config.host_cache_store == str(store) and isinstance(config.host_cache_ratio, DefaultRatio)
    for order in (["--host-cache-ratio", "2", "--host-cache-store", str(store)],
                  ["--host-cache-store", str(store), "--host-cache-ratio", "2"]):
        ns = parse(cli_parser, ["serve", "api_server", "model", *order])
        assert host_values(ns) == {"host_cache_ratio": 2.0, "host_cache_store": str(store)}


def test_api_server_explicit_pytorch_size(cli_parser, tmp_path, captured_serve, hostcache_log):
    run_api_server(cli_parser, tmp_path, "--backend", "pytorch", "--host-cache-size", "0.01")
    (_, kwargs), = captured_serve
    assert kwargs["backend_config"].host_cache_size == 0.01
    assert kwargs["backend_config"].host_cache_ratio == 0.0
    assert hostcache_log() == []  # nothing fell back


def test_api_server_without_flags_unchanged(cli_parser, tmp_path, captured_serve, autoget_backend, hostcache_log):
    autoget_backend("turbomind")
    run_api_server(cli_parser, tmp_path)
    (_, kwargs), = captured_serve
    assert kwargs["backend"] == "turbomind" and type(kwargs["backend_config"]) is TurbomindEngineConfig
    assert kwargs["backend_config"].host_cache_ratio == 0.0
    autoget_backend("pytorch")
    run_api_server(cli_parser, tmp_path)
    config = captured_serve[1][1]["backend_config"]
    assert type(config) is PytorchEngineConfig and config.host_cache_ratio == 0.0
    assert config.host_cache_size is None and config.host_cache_write_policy == "write_through"
    assert hostcache_log() == []


def test_api_server_values_do_not_leak_to_later_configs(cli_parser, tmp_path, captured_serve):
    run_api_server(cli_parser, tmp_path, "--backend", "pytorch", "--host-cache-ratio", "2")
    assert captured_serve[0][1]["backend_config"].host_cache_ratio == 2.0
    assert PytorchEngineConfig().host_cache_ratio == 0.0


# --------------------------------------------------------------------------
# chat: build_pipe copies the namespace onto the config
# --------------------------------------------------------------------------

@pytest.fixture
def captured_pipeline(monkeypatch):
    chat = pytest.importorskip("lmdeploy.cli.chat")
    calls = []

    def fake_pipeline(model_path, backend_config=None, **kwargs):
        calls.append(backend_config)
        raise _Captured

    monkeypatch.setattr(chat, "pipeline", fake_pipeline)
    return calls


@pytest.mark.parametrize("backend", ["pytorch", "turbomind"])
def test_chat_config_carries_values(cli_parser, tmp_path, monkeypatch, captured_pipeline, hostcache_log, backend):
    chat = sys.modules["lmdeploy.cli.chat"]
    monkeypatch.setattr(chat, "autoget_backend", lambda *a, **k: backend)
    args = cli_parser.parse_args(["chat", str(tmp_path), "--host-cache", "--quant-policy", "4",
                                  "--host-cache-write-policy", "write_back"])
    with pytest.raises(_Captured):
        args.run(args)
    config, = captured_pipeline
    assert config.host_cache_ratio == DEFAULT_HOST_CACHE_RATIO and config.host_cache_write_policy == "write_back"
    assert config.quant_policy == 4
    # the pipeline then picks the engine: PyTorch in both cases
    resolved_backend, resolved = sys.modules["lmdeploy.pipeline"].autoget_backend_config(str(tmp_path), config)
    assert resolved_backend == "pytorch" and type(resolved) is PytorchEngineConfig
    assert resolved.host_cache_ratio == DEFAULT_HOST_CACHE_RATIO and resolved.quant_policy == 4
    assert resolved.host_cache_write_policy == "write_back"
    assert len(hostcache_log()) == (1 if backend == "turbomind" else 0)
