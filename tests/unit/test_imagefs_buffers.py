"""The chunk buffer pool and O_DIRECT chunk files (fastboot/imagefs/buffers.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fastboot.imagefs import buffers
from fastboot.imagefs.buffers import BufferPool, DirectWriter
from fastboot.imagefs.store import ImageStore

MiB = 1 << 20


def test_a_buffer_is_reused_only_once_no_view_of_it_is_alive() -> None:
    pool = BufferPool(64 * MiB)
    first = pool.take(4 * MiB)
    base = id(first.obj)  # (holding the mmap itself would keep it lent)
    part = first[MiB : 2 * MiB]  # a slice (like a FUSE reply) keeps the buffer lent
    del first
    second = pool.take(4 * MiB)
    assert id(second.obj) != base
    del part
    third = pool.take(4 * MiB - 100)  # same size class (rounded up to 4 KiB)
    assert id(third.obj) == base
    assert len(third) == 4 * MiB - 100
    assert pool.held_bytes == 8 * MiB


def test_beyond_its_bound_the_pool_lends_untracked_buffers() -> None:
    pool = BufferPool(8 * MiB)
    views = [pool.take(4 * MiB) for _ in range(3)]
    assert pool.held_bytes == 8 * MiB
    assert len({id(v.obj) for v in views}) == 3
    views[2][:3] = b"abc"
    assert bytes(views[2][:3]) == b"abc"


def test_padded_covers_only_the_start_of_a_pool_buffer() -> None:
    pool = BufferPool(MiB)
    view = pool.take(5000)
    whole = buffers.padded(view)
    assert whole is not None and len(whole) == 8192
    assert buffers.padded(view[1:]) is None  # not at the buffer's start: not O_DIRECT-able
    assert buffers.padded(memoryview(bytearray(8192))) is None
    assert buffers.padded(view[:0]) is None


@pytest.mark.parametrize(
    "sizes",
    [[4 * MiB], [4 * MiB + 17], [4 * MiB, 4 * MiB, 123], [1], [3 * 4096, 5000]],
)
def test_direct_writer_writes_exactly_the_bytes(tmp_path: Path, sizes: list[int]) -> None:
    pool = BufferPool(64 * MiB)
    pieces = []
    for i, size in enumerate(sizes):
        data = os.urandom(size)
        if i % 2 == 0:  # pool buffers (O_DIRECT as they are) and plain bytes (copied first)
            view = pool.take(size)
            view[:] = data
            pieces.append(view)
        else:
            pieces.append(data)
    path = tmp_path / "out"
    fd, direct = buffers.open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert direct, "the test directory's filesystem should take O_DIRECT (ext4 here)"
    try:
        writer = DirectWriter(fd, direct, pool)
        for piece in pieces:
            writer.append(piece)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(bytes(p) for p in pieces)
    assert writer.length == sum(sizes)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_where_o_direct_is_refused_everything_is_written_plainly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:  # what a filesystem without O_DIRECT answers
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", no_direct)
    pool = BufferPool(8 * MiB)
    path = tmp_path / "out"
    fd, direct = buffers.open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert not direct
    view = pool.take(MiB + 3)
    view[:] = os.urandom(MiB + 3)
    try:
        DirectWriter(fd, direct, pool).append(view)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(view)
    got = buffers.read_whole(path, pool)
    assert got is not None and bytes(got) == bytes(view)


def test_read_whole_reads_into_the_pool(tmp_path: Path) -> None:
    pool = BufferPool(16 * MiB)
    data = os.urandom(4 * MiB + 5)
    (tmp_path / "f").write_bytes(data)
    got = buffers.read_whole(tmp_path / "f", pool)
    assert got is not None and bytes(got) == data and isinstance(got.obj, type(pool.take(1).obj))
    assert buffers.read_whole(tmp_path / "missing", pool) is None
    (tmp_path / "empty").write_bytes(b"")
    empty = buffers.read_whole(tmp_path / "empty", pool)
    assert empty is not None and len(empty) == 0


def test_ssd_cache_chunks_round_trip_through_o_direct(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store").ensure()
    pool = BufferPool(16 * MiB)
    data = pool.take(4 * MiB - 1)
    data[:] = os.urandom(len(data))
    store.cache_put("ab" * 32, data, pool)
    path = store.cache_path("ab" * 32)
    assert path.stat().st_size == len(data)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list((store.root / "tmp").iterdir())  # published by rename, nothing left over
    back = store.read_cached("ab" * 32, pool)
    assert back is not None and bytes(back) == bytes(data)
    assert store.read_cached("cd" * 32, pool) is None
