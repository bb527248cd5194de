"""Fixtures shared by the GPU tests: the tiny model directory and a place for
figures worth reading in the log even when every test passes."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

_NOTES = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """$HOSTCACHE_TINY_MODEL when it names a built model (scripts/gpu_all.sh
    builds one), else one built now (a few seconds, CPU)."""
    given = os.environ.get("HOSTCACHE_TINY_MODEL")
    if given and (Path(given) / "config.json").exists():
        return given
    import tiny_model

    return str(tiny_model.build(tmp_path_factory.mktemp("hc-tiny")))


@pytest.fixture(scope="session")
def gpu_notes(pytestconfig) -> list:
    """Lines appended here are printed in a 'GPU notes' section at the end."""
    return pytestconfig.stash.setdefault(_NOTES, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    notes = config.stash.get(_NOTES, [])
    if notes:
        terminalreporter.section("GPU notes")
        for line in notes:
            terminalreporter.write_line(line)
