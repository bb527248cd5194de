"""scripts/gpu_all.sh's own logic, without a GPU (GPU_ALL_DRY_RUN=1): the
report opens with failures, a failed or cut step makes the exit code
non-zero, and $OUT holds at most the 8 files the device tool brings back."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("lmdeploy")


def dry_run(out: Path, **env: str) -> subprocess.CompletedProcess:
    e = dict(os.environ, GPU_ALL_DRY_RUN="1", OUT=str(out), HOSTCACHE_TINY_MODEL=str(out.parent / "tiny"), **env)
    return subprocess.run(["bash", "scripts/gpu_all.sh"], cwd=str(REPO), env=e, capture_output=True, text=True,
                          timeout=300)


def test_a_green_dry_run_reports_no_failure(tmp_path):
    out = tmp_path / "gpu"
    r = dry_run(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    report = (out / "report.md").read_text()
    assert report.startswith("# GPU run") and report.index("## failures: none") < report.index("## figures")
    assert "index_match_us_32k" in report and (out / "micro.json").exists()
    # the model drawn in the background was waited for, then the end-to-end step ran
    assert "model build rc=0" in report and "recomputed prompt tokens" in report, report[-3000:]
    assert len(list(out.iterdir())) <= 8, sorted(p.name for p in out.iterdir())


def test_a_failed_test_and_a_cut_step_cannot_look_green(tmp_path):
    failing = tmp_path / "test_fails.py"
    failing.write_text("def test_fails():\n    assert False, 'on purpose'\n")
    out = tmp_path / "gpu"
    r = dry_run(out, GPU_ALL_DRY_RUN_TESTS=str(failing))
    assert r.returncode != 0
    report = (out / "report.md").read_text()
    first = report.split("## figures")[0]
    assert "## failures\n" in first and "pytest: failed" in first and "test_fails" in first, first

    out = tmp_path / "short"
    r = dry_run(out, GPU_ALL_BUDGET_S="3")
    assert r.returncode == 124, r.stdout[-2000:]
    first = (out / "report.md").read_text().split("## figures")[0]
    assert "not run (out of time)" in first, first
