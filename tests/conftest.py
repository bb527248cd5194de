import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

_NOTES = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def run_notes(pytestconfig) -> list:
    """Lines appended here are printed in a 'run notes' section at the end:
    figures worth reading in the log even when every test passes."""
    return pytestconfig.stash.setdefault(_NOTES, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    notes = config.stash.get(_NOTES, [])
    if notes:
        terminalreporter.section("run notes")
        for line in notes:
            terminalreporter.write_line(line)
