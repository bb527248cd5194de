"""Walks docs/bad_input.md: every bad value of every setting this project
adds gets the message the table says, where the table says."""
from __future__ import annotations

import ast
import os
import re

import pytest

pytest.importorskip("lmdeploy")

TABLE = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "bad_input.md")


def rows() -> list[tuple[str, str, str, str]]:
    """(kind, name, bad value, error) of each row, backticks removed."""
    out = []
    for line in open(TABLE).read().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] not in ("config", "cli", "env"):
            continue
        kind, name, _, bad, error = (c.strip("`") for c in cells)
        out.append((kind, name, bad, error))
    return out


ROWS = rows()


def test_the_table_covers_every_setting_and_flag():
    from lmdeploy_patch.cli_flags import HELP
    from lmdeploy_patch.settings import HOST_CACHE_FIELDS

    names = {name for _, name, _, _ in ROWS}
    assert set(HOST_CACHE_FIELDS) <= names, set(HOST_CACHE_FIELDS) - names
    flags = {flag for flag in HELP if flag != "--host-cache"}  # the switch takes no value
    assert flags <= names, flags - names
    assert {"HOSTCACHE_RAM_RESERVE_GIB", "HOSTCACHE_PIN", "HOSTCACHE_COPY_PATH"} <= names


def _value(text: str):
    if text.startswith("float("):
        return float(ast.literal_eval(text[len("float("):-1]))
    return ast.literal_eval(text)


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
        if command == ["chat"]:
            pytest.skip("lmdeploy chat picks its backend itself")
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
    from lmdeploy_patch import rank_tier, settings

    reader = {"HOSTCACHE_RAM_RESERVE_GIB": settings.ram_reserve_bytes, "HOSTCACHE_PIN": rank_tier.pin_mode,
              "HOSTCACHE_COPY_PATH": rank_tier.copy_path}[name]
    monkeypatch.setenv(name, bad)
    with pytest.raises(ValueError) as info:
        reader()
    assert str(info.value).startswith(error), str(info.value)
    monkeypatch.delenv(name)
    reader()  # unset: the default
