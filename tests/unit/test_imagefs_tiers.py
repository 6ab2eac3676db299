"""Tiers with a fake remote: verification, refetch, single-flight, LRU, prefetch planning."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing

from fastboot.errors import ImageCorruptError, RemoteError
from fastboot.imagefs import index as ix
from fastboot.imagefs.build import build
from fastboot.imagefs.fs import ImageOperations
from fastboot.imagefs.metrics import Metrics
from fastboot.imagefs.prefetch import Recorder, TokenBucket, load_profile, plan
from fastboot.imagefs.store import ImageStore
from fastboot.imagefs.tiers import ChunkUnavailable, RamCache, Tiers


class FakeRemote:
    """Serves ranges of the origin store's packs; can be slow, corrupt or down."""

    base_url = "fake://remote"

    def __init__(self, origin: ImageStore) -> None:
        self.origin = origin
        self.calls = 0
        self.delay = 0.0
        self.corrupt = False
        self.down = False
        self.lock = threading.Lock()

    def get_range(
        self, path: str, offset: int, length: int, into: memoryview | None = None
    ) -> bytes | memoryview:
        with self.lock:
            self.calls += 1
        if self.down:
            raise RemoteError("remote down (fake)")
        time.sleep(self.delay)
        data = bytearray((self.origin.root / path).read_bytes()[offset : offset + length])
        if self.corrupt:
            data[0] ^= 1
        if into is not None:
            into[:] = data
            return into
        return bytes(data)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[ImageStore, ImageStore, ix.ImageIndex, FakeRemote]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(bytes(range(256)) * 4096 * 3)  # 3 MiB, compressible
    (src / "b.txt").write_text("bee\n")
    origin = ImageStore(tmp_path / "origin")
    ref = build(origin, src, "img", chunk_size=1 << 20, progress=False)
    host = ImageStore(tmp_path / "host").ensure()
    return origin, host, origin.load_index(ref.index), FakeRemote(origin)


def tiers_for(host: ImageStore, remote: FakeRemote | None) -> tuple[Tiers, Metrics]:
    metrics = Metrics()
    return Tiers(host, remote, metrics), metrics  # type: ignore[arg-type]


def count(metrics: Metrics, name: str, tier: str | None = None) -> float:
    metric = getattr(metrics, name)
    value = (metric.labels(tier) if tier else metric)._value.get()
    return float(value)


def test_remote_chunks_are_verified_decompressed_and_cached(setup: tuple) -> None:  # type: ignore[type-arg]
    _, host, index, remote = setup
    tiers, metrics = tiers_for(host, remote)
    ref = index.file_chunk(index.resolve("a.bin") or 0, 1)
    assert ref.codec == ix.CODEC_ZSTD
    data = trio.run(tiers.get, ref)
    assert bytes(data) == (bytes(range(256)) * 4096 * 3)[1 << 20 : 2 << 20]
    assert host.cache_path(ref.hex).read_bytes() == bytes(data)  # cached raw
    assert remote.calls == 1 and count(metrics, "hits", "remote") == 1
    assert count(metrics, "bytes", "remote") == ref.length < ref.raw_length
    assert trio.run(tiers.get, ref) == data and count(metrics, "hits", "ram") == 1


def test_corrupt_cache_is_refetched_and_corrupt_remote_is_never_served(setup: tuple) -> None:  # type: ignore[type-arg]
    _, host, index, remote = setup
    ref = index.file_chunk(index.resolve("a.bin") or 0, 0)
    host.cache_put(ref.hex, b"rotten" * 10)
    tiers, metrics = tiers_for(host, remote)
    good = tiers.load(ref)
    assert count(metrics, "corrupt", "cache") == 1 and remote.calls == 1
    assert host.cache_path(ref.hex).read_bytes() == bytes(good)

    host.drop_cached(ref.hex)
    remote.corrupt = True
    tiers, metrics = tiers_for(host, remote)
    with pytest.raises(ImageCorruptError, match="does not match its digest"):
        tiers.load(ref)
    assert count(metrics, "corrupt", "remote") == 1
    assert not host.cache_path(ref.hex).exists()


def test_remote_down_and_no_remote_fail_with_reasons(setup: tuple) -> None:  # type: ignore[type-arg]
    _, host, index, remote = setup
    ref = index.file_chunk(index.resolve("b.txt") or 0, 0)
    remote.down = True
    tiers, metrics = tiers_for(host, remote)
    with pytest.raises(RemoteError, match="down"):
        tiers.load(ref)
    assert count(metrics, "remote_errors") == 1
    with pytest.raises(ChunkUnavailable, match="no remote"):
        tiers_for(host, None)[0].load(ref)


def test_concurrent_misses_of_one_chunk_share_one_fetch(setup: tuple) -> None:  # type: ignore[type-arg]
    _, host, index, remote = setup
    remote.delay = 0.2
    tiers, metrics = tiers_for(host, remote)
    ref = index.file_chunk(index.resolve("a.bin") or 0, 2)
    results: list[bytes] = []

    async def main() -> None:
        async def one() -> None:
            results.append(bytes(await tiers.get(ref)))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)

    trio.run(main)
    assert remote.calls == 1
    assert count(metrics, "coalesced") == 4
    assert len(set(results)) == 1 and len(results) == 5


def test_ram_cache_evicts_least_recently_used() -> None:
    ram = RamCache(capacity=10)
    ram.put(b"a", b"12345")
    ram.put(b"b", b"12345")
    assert ram.get(b"a") == b"12345"
    ram.put(b"c", b"12345")
    assert b"b" not in ram and b"a" in ram and b"c" in ram
    ram.put(b"huge", b"x" * 11)
    assert b"huge" not in ram


def test_ram_cache_evicts_a_demoted_chunk_first() -> None:
    ram = RamCache(capacity=10)
    ram.put(b"read", b"12345")
    ram.put(b"ahead", b"12345")
    assert ram.get(b"read") == b"12345"  # touched last, but read to its end:
    ram.demote(b"read")
    ram.put(b"next", b"12345")
    assert b"read" not in ram and b"ahead" in ram and b"next" in ram


def test_a_reader_reading_ahead_of_a_small_ram_cache_fetches_each_chunk_once(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(16 << 20))
    origin = ImageStore(tmp_path / "origin")
    index = origin.load_index(build(origin, src, "i", chunk_size=1 << 20, progress=False).index)
    remote = FakeRemote(origin)
    metrics = Metrics()
    # 8 chunks of RAM and 16 asked for ahead: LRU used to evict the chunks read ahead (inserted
    # before the reader touched the ones it had read) and fetch them again
    tiers = Tiers(ImageStore(tmp_path / "host").ensure(), remote, metrics, ram_bytes=8 << 20)  # type: ignore[arg-type]
    ops = ImageOperations(index, tiers, metrics, None, 16, None)
    entry = index.resolve("f.bin") or 0
    got = bytearray()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            tiers.nursery = nursery
            info = await ops.open(pyfuse3.InodeT(entry + 1), os.O_RDONLY, None)  # type: ignore[arg-type]
            for off in range(0, 16 << 20, 256 << 10):
                got.extend(await ops.read(info.fh, off, 256 << 10))
                await trio.sleep(0)  # let readahead land, as between a kernel's requests
            await ops.release(info.fh)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert bytes(got) == (src / "f.bin").read_bytes()
    # each chunk loaded once (a refetch would come from the SSD cache or the remote)
    assert count(metrics, "misses", "ram") == 16
    assert remote.calls == 16


def test_readahead_reports_how_far_it_got_when_the_threads_are_busy(tmp_path: Path) -> None:
    host, index, remote = distinct_chunks(tmp_path)
    remote.delay = 0.2
    metrics = Metrics()
    tiers = Tiers(host, remote, metrics, threads=2)  # type: ignore[arg-type]
    entry = index.resolve("a.bin") or 0
    refs = [index.file_chunk(entry, k) for k in range(3)]

    async def main() -> tuple[int, int, int]:
        async with trio.open_nursery() as nursery:
            tiers.nursery = nursery
            first = tiers.readahead(refs)  # two threads: two fetches start
            again = tiers.readahead(refs)  # no thread free: nothing seen to, asked again later
            while not (refs[0].digest in tiers.ram and refs[1].digest in tiers.ram):
                await trio.sleep(0.01)
            later = tiers.readahead(refs)  # two in RAM are passed over, the third starts
            nursery.cancel_scope.cancel()
        return first, again, later

    assert trio.run(main) == (2, 0, 3)


def ref(pack: str, offset: int, length: int) -> ix.ChunkRef:
    return ix.ChunkRef(ix.ChunkDigest(bytes([offset % 256]) * 32), pack, offset, length, length)


def test_plan_merges_neighbours_in_one_pack_and_splits_far_or_big_spans() -> None:
    refs = [ref("p", 0, 100), ref("p", 150, 100), ref("p", 10_000_000, 10), ref("q", 0, 5)]
    spans = plan(refs, max_gap=1000, max_span=1 << 20)
    assert [(s.pack, s.offset, s.length, len(s.chunks)) for s in spans] == [
        ("p", 0, 250, 2),
        ("p", 10_000_000, 10, 1),
        ("q", 0, 5, 1),
    ]
    big = [ref("p", i * 1000, 1000) for i in range(10)]
    assert [len(s.chunks) for s in plan(big, max_gap=0, max_span=3000)] == [3, 3, 3, 1]


def test_recorder_keeps_first_access_order_and_round_trips(setup: tuple) -> None:  # type: ignore[type-arg]
    origin, _, index, _ = setup
    recorder = Recorder()
    a, b = index.resolve("a.bin") or 0, index.resolve("b.txt") or 0
    for entry, chunk in [(a, 2), (b, 0), (a, 2), (a, 0), (10_000, 0)]:
        recorder.note(entry, chunk)
    digest = next((origin.root / "index").iterdir()).name
    assert recorder.save(origin, digest) and not recorder.save(origin, digest)
    rows = load_profile(origin.profile_path(digest), index)
    assert rows.tolist() == [(a, 2), (b, 0), (a, 0)]  # the out-of-range row is dropped


def test_token_bucket_caps_the_rate() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> float:
        bucket = TokenBucket(rate=1000)
        start = trio.current_time()
        for _ in range(4):
            await bucket.take(1000)
        return trio.current_time() - start

    # Virtual time: a burst of one second's worth, then 1000 bytes per second.
    bucket_time = trio.run(main, clock=clock)
    assert bucket_time >= 2.9


def distinct_chunks(tmp_path: Path) -> tuple[ImageStore, ix.ImageIndex, FakeRemote]:
    """A host store and an image of one 3 MiB file of three different 1 MiB chunks."""
    src = tmp_path / "src-distinct"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(3 << 20))
    origin = ImageStore(tmp_path / "origin-distinct")
    ref = build(origin, src, "img", chunk_size=1 << 20, progress=False)
    host = ImageStore(tmp_path / "host-distinct").ensure()
    return host, origin.load_index(ref.index), FakeRemote(origin)


def test_in_the_daemon_remote_chunks_are_written_behind_unless_not_kept(tmp_path: Path) -> None:
    host, index, remote = distinct_chunks(tmp_path)
    tiers, _ = tiers_for(host, remote)
    entry = index.resolve("a.bin") or 0
    kept, streamed, ahead = (index.file_chunk(entry, k) for k in range(3))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            tiers.nursery = nursery
            await tiers.get(kept)
            await tiers.get(streamed, keep=False)  # a streamed big file: kept whole instead
            tiers.readahead([ahead], keep=False)
            while ahead.digest not in tiers.ram:
                await trio.sleep(0.01)
            await tiers.drain()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert host.cache_path(kept.hex).exists()
    assert not host.cache_path(streamed.hex).exists()
    assert not host.cache_path(ahead.hex).exists()
    assert remote.calls == 3


def test_readahead_waits_for_room_in_the_write_queue(tmp_path: Path) -> None:
    host, index, remote = distinct_chunks(tmp_path)
    tiers, _ = tiers_for(host, remote)
    tiers.write_backlog_max = 1  # room for one queued chunk at a time
    entry = index.resolve("a.bin") or 0
    refs = [index.file_chunk(entry, k) for k in range(3)]
    most_queued = 0
    real_put = tiers._put

    def slow_put(ref: ix.ChunkRef, data: bytes) -> None:
        nonlocal most_queued
        most_queued = max(most_queued, tiers._write_backlog)
        time.sleep(0.05)
        real_put(ref, data)

    tiers._put = slow_put  # type: ignore[method-assign]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            tiers.nursery = nursery
            tiers.readahead(refs)
            while not all(host.cache_path(r.hex).exists() for r in refs):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert most_queued == refs[0].raw_length  # never more than one chunk waited to be written
