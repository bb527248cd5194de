"""Walks docs/bad_input.md: every bad value of every setting this project
adds gets the message the table says, where the table says."""
from __future__ import annotations

import ast
import os
import re

import pytest

pytest.importorskip("lmdeploy")

TABLE = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "bad_input.md")
KINDS = ("config", "generation", "http", "cli", "env")
# The request fields this project adds (cache_salt.py), each in `generation` and `http` rows.
REQUEST_FIELDS = ("cache_salt",)


def rows() -> list[tuple[str, str, str, str]]:
    """(kind, name, bad value, error) of each row of the table, backticks
    removed; a row that does not parse fails here, not silently."""
    out = []
    lines = [line for line in open(TABLE).read().splitlines() if line.startswith("|")]
    assert lines[0].startswith("| kind |") and set(lines[1]) <= set("|- "), lines[:2]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 5 and cells[0] in KINDS, f"bad row in {TABLE}: {line}"
        kind, name, _, bad, error = (c.strip("`") for c in cells)
        assert name and bad and error, f"a row without its name, bad value or error: {line}"
        out.append((kind, name, bad, error))
    return out


ROWS = rows()


def test_the_table_covers_every_setting_and_flag():
    from lmdeploy_patch.cli_flags import HELP
    from lmdeploy_patch.settings import HOST_CACHE_FIELDS

    names = {name for _, name, _, _ in ROWS}
    assert set(HOST_CACHE_FIELDS) <= names, set(HOST_CACHE_FIELDS) - names
    for kind in ("generation", "http"):
        fields = {name for k, name, _, _ in ROWS if k == kind}
        assert fields == set(REQUEST_FIELDS), (kind, fields)
    flags = {flag for flag in HELP if flag != "--host-cache"}  # the switch takes no value
    assert flags <= names, flags - names
    # every environment variable the package reads with a value to check
    import glob

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    sources = glob.glob(os.path.join(root, "lmdeploy_patch", "**", "*.py"), recursive=True)
    sources += glob.glob(os.path.join(root, "python", "lmdeploy_hostcache", "*.py"))
    read = set()
    for path in sources:
        text = open(path).read()
        read |= set(re.findall(r'environ\.get\("(HOSTCACHE_[A-Z_]+)"', text))
        read |= set(re.findall(r'_choice\("(HOSTCACHE_[A-Z_]+)"', text))
    assert read and read <= names, read - names


def _value(text: str):
    if text.startswith("float("):
        return float(ast.literal_eval(text[len("float("):-1]))
    repeated = re.fullmatch(r'("[^"]*") \* (\d+)', text)  # "s" * 1025
    if repeated:
        return ast.literal_eval(repeated.group(1)) * int(repeated.group(2))
    return ast.literal_eval(text)


@pytest.mark.parametrize("name,bad,error", [(n, b, e) for k, n, b, e in ROWS if k == "generation"],
                         ids=[f"{n}={b}" for k, n, b, _ in ROWS if k == "generation"])
def test_generation_rows(name, bad, error):
    from lmdeploy import GenerationConfig

    with pytest.raises(ValueError) as info:
        GenerationConfig(**{name: _value(bad)})
    assert str(info.value).startswith(error), str(info.value)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("name,bad,error", [(n, b, e) for k, n, b, e in ROWS if k == "http"],
                         ids=[f"{n}={b}" for k, n, b, _ in ROWS if k == "http"])
def test_http_rows(path, name, bad, error):
    """LMDeploy's request models and its API server's validation handler,
    behind FastAPI, as `lmdeploy serve api_server` wires them (without an
    engine: a valid body reaches a stub that echoes the field)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.testclient import TestClient
    from lmdeploy.serve.openai import api_server, protocol

    app = FastAPI()
    for route, model in (("/v1/chat/completions", protocol.ChatCompletionRequest),
                         ("/v1/completions", protocol.CompletionRequest)):
        async def endpoint(request):
            return {name: getattr(request, name)}

        endpoint.__annotations__ = {"request": model}  # a class, not this module's postponed annotation text
        app.post(route)(endpoint)
    app.add_exception_handler(RequestValidationError, api_server.validation_exception_handler)
    body = {"model": "m", **({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})}
    with TestClient(app) as client:
        refused = client.post(path, json={**body, name: _value(bad)})
        accepted = client.post(path, json={**body, name: "tenant-a"})
    assert refused.status_code == 400 and refused.json()["message"].startswith(error), refused.text
    assert accepted.status_code == 200 and accepted.json() == {name: "tenant-a"}


@pytest.mark.parametrize("cls_name", ["PytorchEngineConfig", "TurbomindEngineConfig"])
@pytest.mark.parametrize("name,bad,error", [(n, b, e) for k, n, b, e in ROWS if k == "config"],
                         ids=[f"{n}={b}" for k, n, b, _ in ROWS if k == "config"])
def test_config_rows(cls_name, name, bad, error):
    import lmdeploy.messages as messages

    with pytest.raises((TypeError, ValueError)) as info:
        getattr(messages, cls_name)(**{name: _value(bad)})
    assert str(info.value).startswith(error), str(info.value)


@pytest.mark.parametrize("command", [["serve", "api_server"], ["chat"]], ids=["serve", "chat"])
@pytest.mark.parametrize("name,bad,error", [(n, b, e) for k, n, b, e in ROWS if k == "cli"],
                         ids=[f"{n}={b}" for k, n, b, _ in ROWS if k == "cli"])
def test_cli_rows(cli_parser, capsys, command, name, bad, error):
    if name.startswith("--backend"):
        argv = ["--backend", bad, "--host-cache"]
    else:
        argv = [f"{name}={bad}"]
    with pytest.raises(SystemExit) as info:
        cli_parser.parse_args([*command, "model", *argv])
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(r"error: " + re.escape(error), err), err


@pytest.mark.parametrize("name,bad,error", [(n, b, e) for k, n, b, e in ROWS if k == "env"],
                         ids=[f"{n}={b}" for k, n, b, _ in ROWS if k == "env"])
def test_env_rows(monkeypatch, name, bad, error):
    from lmdeploy_patch import faults, rank_tier, settings

    reader = {"HOSTCACHE_RAM_RESERVE_GIB": settings.ram_reserve_bytes, "HOSTCACHE_PIN": rank_tier.pin_mode,
              "HOSTCACHE_COPY_PATH": rank_tier.copy_path, "HOSTCACHE_FAULTS": faults.from_env}[name]
    monkeypatch.setenv(name, bad)
    with pytest.raises(ValueError) as info:
        reader()
    assert str(info.value).startswith(error), str(info.value)
    monkeypatch.delenv(name)
    reader()  # unset: the default


def test_a_bad_reserve_does_not_break_other_commands(monkeypatch):
    """The variable is refused where a pool is sized, not while every lmdeploy
    command builds its parsers (the --host-cache-size help shows the reserve)."""
    import argparse

    from lmdeploy_patch.cli_flags import add_host_cache_arguments
    from lmdeploy_patch.settings import ram_reserve_bytes

    monkeypatch.setenv("HOSTCACHE_RAM_RESERVE_GIB", "lots")
    add_host_cache_arguments(argparse.ArgumentParser())
    with pytest.raises(ValueError, match="HOSTCACHE_RAM_RESERVE_GIB"):
        ram_reserve_bytes()
