"""Passthrough's backing-id bookkeeping against a fake ioctl: one registration per inode while
it has passthrough opens, dropped with the last one; a refusal turns passthrough off, leaks no
descriptor and leaves the open to the daemon; small or unkept files are never passed through."""

from __future__ import annotations

import os
import struct
import types
from pathlib import Path
from typing import Any

import pytest

from fastboot.imagefs import passthrough
from fastboot.imagefs.buffers import BufferPool
from fastboot.imagefs.build import build
from fastboot.imagefs.metrics import Metrics
from fastboot.imagefs.passthrough import (
    FUSE_DEV_IOC_BACKING_CLOSE,
    FUSE_DEV_IOC_BACKING_OPEN,
    Passthrough,
)
from fastboot.imagefs.store import ImageStore, file_key

SESSION_FD = 1234


class FakeIoctl:
    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[tuple[int, tuple[int, ...]]] = []
        self.refuse = refuse
        self.next_id = 7

    def __call__(self, fd: int, request: int, arg: bytearray) -> int:
        assert fd == SESSION_FD
        if request == FUSE_DEV_IOC_BACKING_OPEN:
            backing_fd, flags, padding = struct.unpack("iIQ", arg)
            os.fstat(backing_fd)  # a real, open descriptor
            self.calls.append((request, (flags, padding)))
            if self.refuse:
                raise PermissionError(1, "Operation not permitted")
            self.next_id += 1
            return self.next_id
        assert request == FUSE_DEV_IOC_BACKING_CLOSE
        self.calls.append((request, struct.unpack("I", arg)))
        return 0


@pytest.fixture
def setup(tmp_path: Path) -> tuple[ImageStore, Any, Path]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 << 20))
    (src / "small").write_bytes(b"x" * 100)
    store = ImageStore(tmp_path / "store")
    ref = build(store, src, "img", chunk_size=1 << 20, progress=False)
    index = store.load_index(ref.index)
    return store, index, src


def through(store: ImageStore, index: Any, ioctl: FakeIoctl) -> Passthrough:
    # no background work in these tests; verifying kept files reads into the pool
    tiers: Any = types.SimpleNamespace(nursery=None, buffers=BufferPool(16 << 20))
    return Passthrough(
        store,
        index,
        tiers,
        Metrics(),
        min_bytes=1 << 20,
        session_fd=lambda: SESSION_FD,
        ioctl=ioctl,
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def entry_of(index: Any, name: str) -> int:
    entry = index.resolve(name)
    assert entry is not None
    return int(entry)


def test_one_backing_id_per_inode_dropped_with_its_last_open(setup: Any) -> None:
    store, index, src = setup
    ioctl = FakeIoctl()
    pt = through(store, index, ioctl)
    big = entry_of(index, "big")
    kept = pt.path(big)
    kept.parent.mkdir(parents=True)
    kept.write_bytes((src / "big").read_bytes())
    assert pt._matches(big, kept)
    pt._ready[big] = kept
    fds = open_fds()

    first, second = pt.open(big), pt.open(big)
    assert first == second == 8
    assert [c[0] for c in ioctl.calls] == [FUSE_DEV_IOC_BACKING_OPEN]
    assert ioctl.calls[0][1] == (0, 0)
    assert open_fds() == fds + 1  # the backing file, held while the inode has passthrough opens
    pt.release(big)
    assert len(ioctl.calls) == 1
    pt.release(big)
    assert ioctl.calls[-1] == (FUSE_DEV_IOC_BACKING_CLOSE, (8,))
    assert open_fds() == fds
    assert pt.open(big) == 9  # a new registration after the last release
    pt.release(big)
    assert ioctl.calls[-1] == (FUSE_DEV_IOC_BACKING_CLOSE, (9,))
    assert open_fds() == fds


def test_small_or_unkept_files_are_left_to_the_daemon(setup: Any) -> None:
    store, index, _ = setup
    ioctl = FakeIoctl()
    pt = through(store, index, ioctl)
    assert pt.open(entry_of(index, "small")) == 0
    assert pt.open(entry_of(index, "big")) == 0  # nothing kept yet
    assert ioctl.calls == []


def test_a_refusal_turns_passthrough_off_without_leaking(setup: Any) -> None:
    store, index, src = setup
    ioctl = FakeIoctl(refuse=True)
    pt = through(store, index, ioctl)
    big = entry_of(index, "big")
    kept = pt.path(big)
    kept.parent.mkdir(parents=True)
    kept.write_bytes((src / "big").read_bytes())
    pt._ready[big] = kept
    fds = open_fds()
    assert pt.open(big) == 0
    assert open_fds() == fds
    assert not pt.enabled
    assert pt.open(big) == 0 and len(ioctl.calls) == 1  # not asked again


def test_a_kept_file_must_match_every_chunk(setup: Any) -> None:
    store, index, src = setup
    pt = through(store, index, FakeIoctl())
    big = entry_of(index, "big")
    kept = pt.path(big)
    kept.parent.mkdir(parents=True)
    data = bytearray((src / "big").read_bytes())
    kept.write_bytes(data)
    assert pt._matches(big, kept)
    data[(3 << 20) - 1] ^= 1
    kept.write_bytes(data)
    assert not pt._matches(big, kept)
    kept.write_bytes(data[:-1])
    assert not pt._matches(big, kept)


def test_the_key_names_the_content_not_the_path(tmp_path: Path) -> None:
    stores = []
    for name in ("a", "b"):
        src = tmp_path / f"src-{name}"
        src.mkdir()
        (src / name).write_bytes(b"same bytes" * 1000)
        store = ImageStore(tmp_path / f"store-{name}")
        ref = build(store, src, "img", progress=False)
        stores.append((store.load_index(ref.index), name))
    keys = {file_key(index, entry_of(index, name)) for index, name in stores}
    assert len(keys) == 1


def test_snapshot_images_are_not_kept_whole(tmp_path: Path) -> None:
    verdicts = {}
    for kind in ("snapshot", "env"):
        src = tmp_path / kind
        src.mkdir()
        (src / "pages-1.img").write_bytes(b"p" * 4096)
        if kind == "snapshot":
            (src / "manifest.json").write_text("{}")
        store = ImageStore(tmp_path / f"store-{kind}")
        ref = build(store, src, kind, progress=False)
        verdicts[kind] = passthrough.worth_it(store.load_index(ref.index))
    assert verdicts == {"snapshot": False, "env": True}
