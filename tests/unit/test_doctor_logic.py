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


def _fake(tmp_path: Path, name: str, help_text: str) -> str:
    path = tmp_path / name
    path.write_text(
        f"#!/bin/sh\n[ \"$1\" = --help ] && {{ echo '{help_text}'; exit 0; }}\n"
        "echo 'Version: 4.2.1'\n"
    )
    path.chmod(0o755)
    return str(path)


def test_probe_sees_the_page_mapping_patch(tmp_path: Path) -> None:
    patched = criu.probe(_fake(tmp_path, "patched", "  --mmap-page-image  map pages"))
    plain = criu.probe(_fake(tmp_path, "plain", "  --auto-dedup  dedup"))
    assert patched is not None and patched.maps_pages
    assert plain is not None and not plain.maps_pages and plain.version == (4, 2, 1)


def test_find_criu_prefers_the_patched_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plain = _fake(tmp_path, "plain", "no patch")
    patched = _fake(tmp_path, "patched", "--mmap-page-image")
    monkeypatch.setattr(criu, "candidates", lambda: [plain, patched])
    assert criu.find_criu().path == patched
    monkeypatch.setattr(criu, "candidates", lambda: [plain])
    assert criu.find_criu().path == plain


def test_restores_map_pages_unless_told_or_on_fuse(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    patched = criu.Criu("criu", (4, 2, 1), maps_pages=True)
    monkeypatch.delenv("FASTBOOT_COPY_PAGES", raising=False)
    assert criu.maps_pages(patched, tmp_path)
    assert not criu.maps_pages(criu.Criu("criu", (4, 2, 1)), tmp_path)
    monkeypatch.setenv("FASTBOOT_COPY_PAGES", "1")
    assert not criu.maps_pages(patched, tmp_path)
    assert "FASTBOOT_COPY_PAGES" in doctor.page_mapping(patched)
    monkeypatch.delenv("FASTBOOT_COPY_PAGES")
    assert "copy-on-write" in doctor.page_mapping(patched)
    assert "fastboot install-criu" in doctor.page_mapping(criu.Criu("criu", (4, 2, 1)))
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        f"fastboot-image {tmp_path}/store fuse.fastboot-image ro 0 0\n"
        f"fastboot-image {tmp_path}/storage fuse.other ro 0 0\n"
    )
    assert criu.on_fuse(tmp_path / "store" / "snap" / "images", mounts)
    assert criu.on_fuse(tmp_path / "storage", mounts)
    assert not criu.on_fuse(tmp_path / "stor", mounts)
    assert not criu.on_fuse(tmp_path / "elsewhere", mounts)
