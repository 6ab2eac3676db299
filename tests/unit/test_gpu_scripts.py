"""The lent-GPU scripts in tests/gpu dry-run on a machine without a GPU: exit 77, say why, write
their JSON, and try nothing (no CRIU, no child process). On a GPU host they would run for real,
which is tests/gpu/run.sh's job, not this test's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "tests" / "gpu"

pytestmark = pytest.mark.skipif(
    any(Path("/dev").glob("nvidia[0-9]*")), reason="a GPU host: tests/gpu/run.sh runs for real"
)


def test_run_sh_dry_run_exits_77_with_json(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(GPU / "run.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 77, done.stdout + done.stderr
    assert "no GPU on this machine" in done.stdout
    assert json.loads((tmp_path / "gpu_checkpoint.json").read_text())["exit_code"] == 77


@pytest.mark.parametrize("script", ["checkpoint_roundtrip.py", "lock_timeout.py"])
def test_python_checks_dry_run_exit_77(script: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(GPU / script), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 77, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["exit_code"] == 77 and result["message"].startswith("no GPU")
    assert result["passed"] is False
    assert not list(Path("/tmp").glob("fastboot-gpu-*")), "a dry run must create nothing"
