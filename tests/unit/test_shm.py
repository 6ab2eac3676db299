"""/dev/shm bookkeeping of fastboot.host.shm, on a directory standing in for /dev/shm."""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

import pytest

from fastboot.host import shm


@pytest.fixture
def shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "shm"
    path.mkdir()
    monkeypatch.setattr(shm, "SHM", path)
    return path


def test_a_semaphore_mapped_under_a_deleted_name_counts_under_its_names(shm_dir: Path) -> None:
    # What glibc's sem_open does: a temporary file, mapped, linked to the real name, unlinked.
    temp = shm_dir / "sem.Xa1b2c"
    temp.write_bytes(b"\1" * 32)
    (shm_dir / "psm_unused").write_bytes(b"x")
    with open(temp, "r+b") as f, mmap.mmap(f.fileno(), 32):
        os.link(temp, shm_dir / "sem.mp-real")
        temp.unlink()
        assert shm.referenced([os.getpid()]) == {"sem.mp-real"}
        with open(shm_dir / "psm_unused", "rb"):  # an open file counts too
            assert shm.referenced([os.getpid()]) == {"sem.mp-real", "psm_unused"}


def test_names_of_one_file_are_saved_and_put_back_as_hard_links(
    shm_dir: Path, tmp_path: Path
) -> None:
    (shm_dir / "sem.mp-real").write_bytes(b"\2" * 32)
    os.link(shm_dir / "sem.mp-real", shm_dir / "link_remap.7")  # CRIU's remap of a mapping
    (shm_dir / "psm_q").write_bytes(b"q" * 100)
    saved = tmp_path / "saved"
    names = {"sem.mp-real", "link_remap.7", "psm_q", "gone"}
    assert shm.save(names, saved) == ["link_remap.7", "psm_q", "sem.mp-real"]
    assert (saved / "sem.mp-real").stat().st_ino == (saved / "link_remap.7").stat().st_ino
    for path in shm_dir.iterdir():
        path.unlink()
    for _ in range(2):  # the second time over the names the first one placed
        placed = shm.put_back(saved)
        assert placed == ["link_remap.7", "psm_q", "sem.mp-real"]
        real, remap = shm_dir / "sem.mp-real", shm_dir / "link_remap.7"
        assert real.stat().st_ino == remap.stat().st_ino != (shm_dir / "psm_q").stat().st_ino
        assert real.read_bytes() == b"\2" * 32 and (shm_dir / "psm_q").read_bytes() == b"q" * 100
        assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert sorted(p.name for p in shm_dir.iterdir()) == placed  # no temporary left
