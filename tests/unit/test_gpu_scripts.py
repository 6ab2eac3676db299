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


def test_serve_gpu_dry_run_exits_77_with_json(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(GPU / "serve_gpu.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 77, done.stdout + done.stderr
    assert "no GPU on this machine" in done.stdout
    assert json.loads((tmp_path / "serve_gpu.json").read_text())["exit_code"] == 77
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serve_gpu.json"]  # nothing tried


def _serve_gpu_logs(work: Path, restored_ids: list[int]) -> None:
    """What serve_gpu.sh leaves in its work dir, for a run whose restores answered ids."""
    answer = {"choices": [{"text": "x", "token_ids": [1, 2, 3]}]}
    (work / "plain.log").write_text("gpu_server: ...\n")
    (work / "plain.seconds").write_text("21.5\n")
    (work / "plain.gpu").write_text("0\n2048\n")
    (work / "cold.log").write_text(
        "12:00:00 fastboot INFO no snapshot abc123 yet: cold boot\n"
        "12:00:30 fastboot INFO cold boot ready in 30.5 s\n"
        "12:00:40 fastboot INFO snapshot abc123 published: 1.25 GB, dumped in 4.2 s\n"
        "12:00:42 fastboot INFO restored snapshot abc123 in 1.80 s; cold boot was 30.5 s\n"
    )
    for name in ("restore1", "restore2"):
        (work / f"{name}.log").write_text(
            "12:01:00 fastboot WARNING restoring onto other GPUs: a->b\n"
            "12:01:01 fastboot INFO restored snapshot abc123 in 1.50 s; cold boot was 30.5 s\n"
        )
    for name in ("plain", "cold", "restore1", "restore2"):
        ids = restored_ids if name.startswith("restore") else [1, 2, 3]
        choice = {**answer["choices"][0], "token_ids": ids}
        (work / f"{name}.answer.json").write_text(json.dumps({"choices": [choice]}))
    for name in ("cold", "restore1", "restore2"):
        (work / f"{name}.gpu").write_text("0\n2100\n0\n")


def _report(work: Path) -> tuple[int, dict[str, object]]:
    out = work / "report.json"
    done = subprocess.run(
        [sys.executable, str(GPU / "serve_gpu_report.py"), str(work), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, json.loads(out.read_text())


def test_serve_gpu_report_reads_the_runs(tmp_path: Path) -> None:
    _serve_gpu_logs(tmp_path, [1, 2, 3])
    code, result = _report(tmp_path)
    assert code == 0 and result["passed"] is True, result["problems"]
    assert result["cold_boot_s"] == 30.5 and result["restore_s"] == [1.5, 1.5]
    assert result["plain_first_answer_s"] == 21.5
    runs = result["runs"]
    assert isinstance(runs, dict)
    assert runs["cold"]["snapshot"] == "abc123" and runs["cold"]["dump_s"] == 4.2
    assert runs["restore1"]["gpu_used_mib"] == {"before": 0, "serving": 2100, "after": 0}
    assert runs["restore1"]["warnings"] == ["restoring onto other GPUs: a->b"]


def test_serve_gpu_report_fails_on_a_wrong_answer_or_a_cold_boot(tmp_path: Path) -> None:
    _serve_gpu_logs(tmp_path, [1, 2, 4])
    with (tmp_path / "restore2.log").open("a") as log:
        log.write("12:02:00 fastboot INFO cold boot ready in 30.0 s\n")
    code, result = _report(tmp_path)
    assert code == 1 and result["passed"] is False
    problems = "\n".join(map(str, result["problems"]))  # type: ignore[call-overload]
    assert "restore2 did not restore the snapshot" in problems
    assert "restore1 answered [1, 2, 4], plain [1, 2, 3]" in problems
