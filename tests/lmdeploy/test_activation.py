"""Activation through the installed .pth file, in fresh interpreters: on by
default, off with LMDEPLOY_HOSTCACHE_DISABLE=1, and LMDeploy left untouched
(with one log line) when the version or a hooked signature does not match.
The scripts are in conftest.py; they run concurrently."""
import pytest

pytest.importorskip("lmdeploy")

UNTOUCHED = "touched [False, False, False, False, False, False, False, 0]"


def hostcache_lines(text):
    return [line for line in text.splitlines() if "lmdeploy-hostcache" in line]


def test_pth_activates_in_fresh_interpreter(runs):
    run = runs.get("activation")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "2.0"
    assert hostcache_lines(run.stderr) == []


def test_disable_env_leaves_lmdeploy_unpatched(runs):
    run = runs.get("disabled")
    assert run.returncode == 0, run.stderr
    flags, enabled = run.stdout.splitlines()
    assert flags.split() == ["False", "False", "False", "False"]
    assert enabled == "None"  # never checked: the hooks were not even registered


def test_version_mismatch_leaves_lmdeploy_untouched(runs):
    run = runs.get("version_mismatch")
    assert run.returncode == 0, run.stderr
    assert UNTOUCHED in run.stdout
    assert "field refused" in run.stdout
    lines = hostcache_lines(run.stderr)
    assert len(lines) == 1, run.stderr
    assert "0.17.0" in lines[0] and "0.18.0" in lines[0] and "untouched" in lines[0]


def test_changed_signature_reverts_every_patch(runs):
    run = runs.get("signature_changed")
    assert run.returncode == 0, run.stderr
    assert UNTOUCHED in run.stdout  # patches made before the failing check are reverted too
    assert "status False" in run.stdout
    lines = hostcache_lines(run.stderr)
    assert len(lines) == 1, run.stderr
    assert "build_cache_config" in lines[0] and "['cfg']" in lines[0]
