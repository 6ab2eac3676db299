"""The daemon's deferred SSD-cache writes of prefetched chunks: only once the mount is quiet,
at the latest after MAX_DEFER_S, and at once at unmount."""

from __future__ import annotations

import trio
import trio.testing

from fastboot.imagefs import daemon
from fastboot.imagefs.index import ChunkRef
from fastboot.imagefs.tiers import Blob


def run_writes(busy_until: float, finish_at: float | None = None) -> tuple[float | None, int]:
    """When (trio time) the chunks were written with requests coming until busy_until, and how
    many; `finish_at`: the mount is unmounted then."""
    kept: list[ChunkRef] = []
    written_at: list[float] = []
    chunks: list[tuple[ChunkRef, Blob]] = [(ChunkRef.__new__(ChunkRef), b"x")] * 3

    def idle_s() -> float:
        now = trio.current_time()
        return 0.0 if now < busy_until else now - busy_until

    def keep(ref: ChunkRef, data: Blob) -> None:
        kept.append(ref)

    async def main() -> None:
        writes = daemon.DeferredWrites(keep, idle_s)
        async with trio.open_nursery() as nursery:
            writes.bind(nursery)
            writes.start(chunks)
            if finish_at is not None:
                await trio.sleep(finish_at)
                await writes.finish()
                written_at.append(trio.current_time())
        if finish_at is None:
            written_at.append(trio.current_time())
        assert writes.written == len(kept)

    # the clock jumps only once every task has waited a while in real time: never while the
    # write's worker thread runs
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.02))
    return (written_at[0] if written_at else None), len(kept)


def test_chunks_wait_for_a_quiet_mount() -> None:
    at, count = run_writes(busy_until=3.0)
    assert count == 3
    assert at is not None and 3.0 + daemon.QUIET_S <= at < 3.0 + daemon.QUIET_S + 0.2


def test_a_mount_that_stays_busy_gets_them_written_after_max_defer() -> None:
    at, count = run_writes(busy_until=1e9)
    assert count == 3
    assert at is not None and daemon.MAX_DEFER_S <= at < daemon.MAX_DEFER_S + 0.2


def test_unmount_writes_them_at_once_and_waits_for_them() -> None:
    at, count = run_writes(busy_until=1e9, finish_at=1.0)
    assert (at, count) == (1.0, 3)
