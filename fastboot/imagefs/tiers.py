"""Where a chunk's bytes come from: RAM LRU -> local pack -> SSD cache -> remote.

Every tier's bytes are checked against the chunk's BLAKE3 before they are used: a corrupt local
or cached copy is counted, dropped and read from the next tier; a corrupt remote copy is never
cached and the read fails (EIO), so a reader never gets wrong bytes. Concurrent misses of one
chunk share one fetch (single-flight). Disk, network and hashing run in worker threads under one
limiter, so the trio loop that answers the kernel never blocks.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable

import trio

from fastboot.errors import ImageCorruptError, ImageFSError
from fastboot.imagefs.buffers import BufferPool
from fastboot.imagefs.index import DEFAULT_CHUNK_SIZE, ChunkDigest, ChunkRef
from fastboot.imagefs.metrics import Metrics
from fastboot.imagefs.remote import RemoteClient
from fastboot.imagefs.store import ImageStore, decode, digest_of

logger = logging.getLogger(__name__)

Blob = bytes | bytearray | memoryview


class ChunkUnavailable(ImageFSError):
    """No tier could supply a chunk's verified bytes (the message says why)."""


class RamCache:
    """A byte-bounded LRU of verified chunks."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self._items: OrderedDict[bytes, Blob] = OrderedDict()

    def get(self, digest: bytes) -> Blob | None:
        data = self._items.get(digest)
        if data is not None:
            self._items.move_to_end(digest)
        return data

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._items

    def demote(self, digest: bytes) -> None:
        """Make `digest` the first to go: a chunk read to its end is in the kernel's page
        cache now, while chunks read ahead are not read yet. Plain LRU kept the chunks just
        read (touched last) and evicted the ones read ahead (inserted earlier), so a reader
        with more than half the cache ahead of it fetched almost every chunk twice."""
        if digest in self._items:
            self._items.move_to_end(digest, last=False)

    def put(self, digest: bytes, data: Blob) -> None:
        if len(data) > self.capacity or digest in self._items:
            return
        self._items[digest] = data
        self.size += len(data)
        while self.size > self.capacity:
            _, old = self._items.popitem(last=False)
            self.size -= len(old)


class _Flight:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: Blob | None = None
        self.error: BaseException | None = None


class Tiers:
    """Verified chunk bytes for one mounted image."""

    def __init__(
        self,
        store: ImageStore,
        remote: RemoteClient | None,
        metrics: Metrics,
        ram_bytes: int = 64 * 1024 * 1024,
        threads: int = 8,
    ) -> None:
        self.store = store
        self.remote = remote
        self.metrics = metrics
        self.ram = RamCache(ram_bytes)
        self.buffers = BufferPool(ram_bytes + 2 * threads * DEFAULT_CHUNK_SIZE)
        """What chunks from the SSD cache and the remote are read into: reused once the RAM
        cache and every reader have let go (room for the RAM cache, and a chunk per thread in
        flight and per thread waiting to be written)."""
        self.limiter = trio.CapacityLimiter(threads)
        self._flights: dict[bytes, _Flight] = {}
        self.prefetched: set[bytes] = set()
        self._from_remote: set[bytes] = set()
        """Digests fetched by prefetch that no reader has asked for yet."""
        self.nursery: trio.Nursery | None = None
        """Where background readahead and cache writes run (set by the daemon)."""
        self._readahead_budget = threads
        self._writer = trio.CapacityLimiter(2)
        self._write_backlog = 0
        self.write_backlog_max = threads * DEFAULT_CHUNK_SIZE
        """Bytes of verified chunks waiting to be written to the SSD cache (see _queue_write)."""
        self._written = trio.lowlevel.ParkingLot()

    async def get(self, ref: ChunkRef, *, reader: bool = True, keep: bool = True) -> Blob:
        """The chunk's verified bytes. `reader` is False for readahead (not counted as use);
        `keep` False: a chunk from the remote is not written to the SSD cache (the caller keeps
        it otherwise: a big file streamed whole, see ImageOperations.read)."""
        digest = ref.digest
        if reader and digest in self.prefetched:
            self.prefetched.discard(digest)
            self.metrics.prefetch_used.inc(ref.raw_length)
        data = self.ram.get(digest)
        if data is not None:
            self.metrics.hits.labels("ram").inc()
            return data
        flight = self._flights.get(digest)
        if flight is not None:
            self.metrics.coalesced.inc()
            await flight.done.wait()
            if flight.data is None:
                raise ChunkUnavailable(f"chunk {ref.hex[:16]}…: {flight.error}")
            return flight.data
        self.metrics.misses.labels("ram").inc()
        flight = self._flights[digest] = _Flight()
        later = self.nursery is not None
        try:
            data = await trio.to_thread.run_sync(self.load, ref, not later, limiter=self.limiter)
            flight.data = data
            self.ram.put(digest, data)
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[digest]
            flight.done.set()
        if later and self.last_tier_remote(ref):
            if not keep:
                self._from_remote.discard(ref.digest)
            elif reader:
                # a reader never waits for the disk: queue the write and answer
                self._queue_write(ref, data)
            else:
                # readahead waits for room in the write queue, so it cannot outrun the disk
                await self._room_to_write(len(data))
                self._queue_write(ref, data)
        return data

    def readahead(self, refs: Iterable[ChunkRef], keep: bool = True) -> int:
        """Fetch these chunks in the background (skipping ones in RAM or in flight), as many as
        there are fetch threads free; returns how many of `refs` (from the first) it saw to."""
        if self.nursery is None:  # outside the daemon there is no background work
            return sum(1 for _ in refs)
        if self._readahead_budget <= 0:
            return 0
        seen = 0
        for seen, ref in enumerate(refs, 1):
            if ref.digest in self.ram or ref.digest in self._flights:
                continue
            if self._readahead_budget <= 0:
                return seen - 1
            self._readahead_budget -= 1
            self.metrics.readahead.inc()
            self.nursery.start_soon(self._background_get, ref, keep)
        return seen

    def last_tier_remote(self, ref: ChunkRef) -> bool:
        return ref.digest in self._from_remote

    async def _room_to_write(self, size: int) -> None:
        while self._write_backlog and self._write_backlog + size > self.write_backlog_max:
            await self._written.park()

    def _queue_write(self, ref: ChunkRef, data: Blob) -> None:
        # Written off the reader's path, by O_DIRECT from the chunk's pool buffer. The queue is
        # short on purpose: every queued chunk holds a buffer, and when readahead outran the
        # writers a 256 MiB queue made a cold 1 GiB read touch 400-540 MiB of fresh buffers,
        # which cost more than everything else (fastboot/imagefs/buffers.py). Readahead waits
        # for room instead; chunks a reader fetched beyond twice the limit are not cached.
        self._from_remote.discard(ref.digest)
        assert self.nursery is not None  # only the daemon, with its nursery, writes behind
        if self._write_backlog and self._write_backlog + len(data) > 2 * self.write_backlog_max:
            logger.debug("not caching chunk %s: the write queue is full", ref.hex[:16])
            return
        self._write_backlog += len(data)

        async def write() -> None:
            try:
                await trio.to_thread.run_sync(self._put, ref, data, limiter=self._writer)
            finally:
                self._write_backlog -= len(data)
                self._written.unpark_all()

        self.nursery.start_soon(write)

    async def drain(self, deadline_s: float = 30.0) -> None:
        """Wait until the chunks queued for the SSD cache are written (at unmount)."""
        with trio.move_on_after(deadline_s):
            while self._write_backlog:
                await trio.sleep(0.01)

    def keep(self, ref: ChunkRef, data: Blob) -> None:
        """Write verified bytes of ref to the SSD cache (blocking; failures logged)."""
        self._put(ref, data)
        self._from_remote.discard(ref.digest)

    def _put(self, ref: ChunkRef, data: Blob) -> None:
        try:
            self.store.cache_put(ref.hex, data, self.buffers)
        except OSError as exc:
            logger.warning("could not keep chunk %s in the SSD cache: %s", ref.hex[:16], exc)

    async def _background_get(self, ref: ChunkRef, keep: bool = True) -> None:
        try:
            await self.get(ref, reader=False, keep=keep)
        except ImageFSError as exc:
            logger.debug("readahead of chunk %s failed: %s", ref.hex[:16], exc)
        finally:
            self._readahead_budget += 1

    # -- blocking, in worker threads ---------------------------------------------------------

    def load(self, ref: ChunkRef, write_cache: bool = True) -> Blob:
        """Read `ref` from the first tier that has it intact (blocking). Without `write_cache`,
        a chunk from the remote is left for the caller to cache (see `last_tier_remote`)."""
        m = self.metrics
        stored = self.store.read_local(ref)
        if stored is not None:
            data = self._decoded(ref, stored, "local")
            if data is not None:
                m.hits.labels("local").inc()
                m.bytes.labels("local").inc(len(stored))
                return data
        else:
            m.misses.labels("local").inc()
        cached = self.store.read_cached(ref.hex, self.buffers)
        if cached is not None:
            data = self._decoded(ref, cached, "cache", raw=True)
            if data is not None:
                m.hits.labels("cache").inc()
                m.bytes.labels("cache").inc(len(data))
                return data
            self.store.drop_cached(ref.hex)
        else:
            m.misses.labels("cache").inc()
        return self.fetch(ref, write_cache)

    def fetch(self, ref: ChunkRef, write_cache: bool = True) -> Blob:
        """Get `ref` from the remote, verify it and keep it in the SSD cache (blocking)."""
        if self.remote is None:
            raise ChunkUnavailable(
                f"chunk {ref.hex[:16]}… of pack {ref.pack[:16]}… is in no local tier and the "
                "image has no remote; pull it again with `--remote URL`, or mount with one"
            )
        started = time.perf_counter()
        try:
            data = self.remote.get_range(
                f"packs/{ref.pack}.pack", ref.offset, ref.length, self.buffers.take(ref.length)
            )
        except ImageFSError:
            self.metrics.remote_errors.inc()
            self.metrics.misses.labels("remote").inc()
            raise
        self.metrics.remote_seconds.observe(time.perf_counter() - started)
        return self.accept_remote(ref, data, write_cache)

    def accept_remote(self, ref: ChunkRef, stored: Blob, write_cache: bool = True) -> Blob:
        """Decode and verify remote bytes of `ref`, cache them on SSD, count them (blocking)."""
        data = self._decoded(ref, stored, "remote")
        if data is None:
            raise ImageCorruptError(
                f"chunk {ref.hex[:16]}… from {self.remote.base_url if self.remote else 'remote'}"
                f"/packs/{ref.pack[:16]}… does not match its digest; not served. Re-push the "
                "image to the remote (or check what rewrites files there)"
            )
        if write_cache:
            self._put(ref, data)
        else:
            self._from_remote.add(ref.digest)
        self.metrics.hits.labels("remote").inc()
        self.metrics.bytes.labels("remote").inc(len(stored))
        self.metrics.remote_raw_bytes.inc(len(data))
        return data

    def is_local(self, ref: ChunkRef) -> bool:
        """Whether a tier below the remote holds `ref` (not verified; blocking)."""
        return self.store.has_pack(ref.pack) or self.store.cache_path(ref.hex).exists()

    def _decoded(self, ref: ChunkRef, stored: Blob, tier: str, raw: bool = False) -> Blob | None:
        """The verified raw bytes of `ref` from a tier's copy, or None (counted, logged)."""
        why = ""
        data: Blob | None = None
        try:
            data = stored if raw else decode(ref, stored)
        except ImageFSError as exc:
            why = str(exc)
        if data is not None:
            # one chunk per thread: hashing each on all cores only adds hand-offs
            intact = digest_of(data, parallel=False) == ChunkDigest(ref.digest)
            if len(data) == ref.raw_length and intact:
                return data
            why = f"{len(data)} bytes, expected {ref.raw_length}, digest mismatch"
        self.metrics.corrupt.labels(tier).inc()
        logger.error(
            "chunk %s from the %s tier is corrupt (%s); not served, trying the next tier",
            ref.hex[:16],
            tier,
            why,
        )
        return None
