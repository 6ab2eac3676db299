"""Doctor's mode logic and output, with made-up check results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastboot import doctor
from fastboot.cli import main as cli
from fastboot.snapshot import criu

CHECKS = [
    doctor.Check("criu", True, "4.2.1", needed_by=("cpu", "gpu")),
    doctor.Check("fuse", False, "no /dev/fuse", "apt-get install fuse3", ("imagefs",)),
    doctor.Check("gpu", False, "no driver", "install a driver", ("gpu",)),
    doctor.Check("cgroups", False, "v1 read-only", "mount cgroup2"),
]


def test_required_failures_by_mode() -> None:
    names = lambda mode: [c.name for c in doctor.required_failures(CHECKS, mode)]  # noqa: E731
    assert names("cpu") == []
    assert names("gpu") == ["gpu"]
    assert names("imagefs") == ["fuse"]
    assert names("all") == ["fuse", "gpu"]  # cgroups is never required


def test_auto_mode_follows_the_gpu_check() -> None:
    assert doctor.resolve_mode("auto", CHECKS) == "cpu"
    with_gpu = [*CHECKS[:2], doctor.Check("gpu", True, "driver 580", needed_by=("gpu",))]
    assert doctor.resolve_mode("auto", with_gpu) == "gpu"
    assert doctor.resolve_mode("imagefs", CHECKS) == "imagefs"


@pytest.fixture
def fake_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "run_checks", lambda engine="vllm": list(CHECKS))


@pytest.mark.usefixtures("fake_checks")
def test_cli_text_one_line_per_capability_with_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor", "--mode", "imagefs"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(CHECKS) + 1
    assert lines[0].split()[:2] == ["ok", "criu"]
    assert lines[1].startswith("FAIL") and "fix: apt-get install fuse3" in lines[1]
    assert lines[2].startswith("warn")  # gpu is not needed for imagefs
    assert lines[-1] == "mode imagefs: not ready (fuse)"
    assert cli.main(["doctor", "--mode", "cpu"]) == 0


@pytest.mark.usefixtures("fake_checks")
def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor", "--json", "--mode", "gpu"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["mode"] == "gpu" and document["ok"] is False
    assert [c["name"] for c in document["checks"]] == [c.name for c in CHECKS]


def test_criu_version_parsing() -> None:
    assert criu.parse_version("Version: 4.2.1\nGitID: v4.2.1\n") == (4, 2, 1)
    assert criu.parse_version("Version: 3.17\n") == (3, 17, 0)
    assert criu.parse_version("criu: command not found") is None


def test_find_criu_refuses_old_and_says_how_to_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    old = tmp_path / "criu"
    old.write_text("#!/bin/sh\necho 'Version: 3.17.1'\n")
    old.chmod(0o755)
    monkeypatch.setenv("FASTBOOT_CRIU", str(old))
    with pytest.raises(criu.CriuMissingError, match=r"3\.17\.1, too old.*fastboot install-criu"):
        criu.find_criu()
    monkeypatch.setenv("FASTBOOT_CRIU", str(old) + "-missing")
    with pytest.raises(criu.CriuMissingError, match="does not run"):
        criu.find_criu()
