"""Which reads keep a big file streaming (ImageOperations.read; a fake passthrough records what
the daemon asks of it)."""

from __future__ import annotations

import os
from pathlib import Path

import pyfuse3
import trio

from fastboot.imagefs.build import build
from fastboot.imagefs.fs import ImageOperations
from fastboot.imagefs.metrics import Metrics
from fastboot.imagefs.store import ImageStore
from fastboot.imagefs.tiers import Tiers

MiB = 1 << 20


class FakePassthrough:
    def __init__(self) -> None:
        self.kept: list[tuple[int, range]] = []
        self.ended: list[int] = []

    async def settle(self, entry: int) -> None:
        return None

    def open(self, entry: int) -> int:
        return 0  # every open is served by the daemon

    def streams(self, entry: int) -> bool:
        return True

    def keep_chunks(self, entry: int, chunks: range) -> None:
        self.kept.append((entry, chunks))

    def read_to_end(self, entry: int) -> None:
        self.ended.append(entry)

    def release(self, entry: int) -> None:
        return None


class Ctx:
    pid = 0  # no such thread: not the daemon's own read


def reads(tmp_path: Path, offsets: list[int]) -> FakePassthrough:
    """Open a 64 MiB file of an image with 4 MiB chunks, read 1 MiB at each offset, close."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(64 * MiB))
    store = ImageStore(tmp_path / "store")
    index = store.load_index(build(store, src, "s", progress=False).index)
    through = FakePassthrough()
    ops = ImageOperations(index, Tiers(store, None, Metrics()), Metrics(), None, 8, through)  # type: ignore[arg-type]
    entry = index.resolve("f.bin") or 0

    async def main() -> None:
        info = await ops.open(pyfuse3.InodeT(entry + 1), os.O_RDONLY, Ctx())  # type: ignore[arg-type]
        for off in offsets:
            assert len(await ops.read(info.fh, off, MiB)) == MiB
        await ops.release(info.fh)

    trio.run(main)
    return through


def test_reads_slightly_out_of_order_keep_the_stream(tmp_path: Path) -> None:
    # concurrent readahead can answer 2-3 MiB before 1-2 MiB
    through = reads(tmp_path, [0, 2 * MiB, MiB, 3 * MiB, 4 * MiB])
    # still streaming at close: the chunks it left out of the SSD cache (those read, 0-1, and
    # the 8 fetched ahead of the reader) are cached now
    [(_, chunks)] = through.kept
    assert chunks == range(10)


def test_a_jump_ahead_ends_the_stream_and_caches_what_it_left_out(tmp_path: Path) -> None:
    through = reads(tmp_path, [0, MiB, 40 * MiB, 41 * MiB])
    [(_, chunks)] = through.kept
    assert chunks == range(9)  # chunk 0 and 8 ahead streamed; from 40 MiB on, cached as usual
    assert not through.ended


def test_a_stream_to_the_end_is_kept_whole(tmp_path: Path) -> None:
    through = reads(tmp_path, [k * MiB for k in range(64)])
    assert len(through.ended) == 1 and not through.kept
