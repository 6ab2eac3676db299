"""Prefetch profiles: record the first-access order of (file, chunk) during a mount, replay it
at the next mount of the same index in the background, under a bandwidth cap.

A profile is `profiles/<index digest>` in the store: MAGIC then PROFILE_DTYPE rows (entry number,
chunk number), in the order the readers first touched them. Replay walks the profile in windows,
skips chunks some local tier already has, merges chunks that sit close together in one pack into
one ranged GET (the builder packs files in path order, so an import's neighbouring files are
neighbours in the pack too), verifies every chunk and keeps it in the SSD cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from fastboot.errors import ImageFSError
from fastboot.imagefs.index import ChunkRef, ImageIndex
from fastboot.imagefs.store import ImageStore
from fastboot.imagefs.tiers import Blob, Tiers

logger = logging.getLogger(__name__)

MAGIC = b"FBPROF01"
PROFILE_DTYPE = np.dtype([("entry", "<u4"), ("chunk", "<u4")])
WINDOW = 256
"""Profile rows planned together (their GETs may run out of order within a window)."""
MAX_GAP = 256 * 1024
"""Bytes of unwanted data worth fetching to join two wanted chunks into one GET."""
MAX_SPAN = 8 * 1024 * 1024


class Recorder:
    """First-access order of (entry, chunk) during one mount."""

    def __init__(self) -> None:
        self._seen: set[tuple[int, int]] = set()
        self.order: list[tuple[int, int]] = []
        self.saved = 0

    def note(self, entry: int, chunk: int) -> None:
        key = (entry, chunk)
        if key not in self._seen:
            self._seen.add(key)
            self.order.append(key)

    def __len__(self) -> int:
        return len(self.order)

    def save(self, store: ImageStore, index_digest: str) -> bool:
        """Write the profile if it grew since the last save (atomic)."""
        if len(self.order) == self.saved or not self.order:
            return False
        rows = np.array(self.order, dtype=PROFILE_DTYPE)
        store.write_atomic(store.profile_path(index_digest), MAGIC + rows.tobytes())
        self.saved = len(rows)
        return True


def load_profile(path: Path, index: ImageIndex) -> np.ndarray[Any, Any]:
    """The rows of a profile that make sense for `index` (a bad profile is ignored, logged)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return np.zeros(0, PROFILE_DTYPE)
    body = data[len(MAGIC) :]
    if not data.startswith(MAGIC) or len(body) % PROFILE_DTYPE.itemsize:
        logger.warning("ignoring malformed prefetch profile %s", path)
        return np.zeros(0, PROFILE_DTYPE)
    rows = np.frombuffer(body, PROFILE_DTYPE)
    entries = rows["entry"]
    ok = entries < len(index)
    ok[ok] &= rows["chunk"][ok] < index.entries["chunk_count"][entries[ok]]
    if not ok.all():
        logger.warning("ignoring %d rows of prefetch profile %s", int((~ok).sum()), path)
    return rows[ok]


@dataclass(frozen=True)
class Span:
    """One ranged GET: a byte span of one pack covering `chunks`."""

    pack: str
    offset: int
    length: int
    chunks: tuple[ChunkRef, ...]


def plan(refs: list[ChunkRef], max_gap: int = MAX_GAP, max_span: int = MAX_SPAN) -> list[Span]:
    """Group chunks into as few ranged GETs as sensible (same pack, close together)."""
    spans: list[Span] = []
    by_pack: dict[str, list[ChunkRef]] = {}
    for ref in refs:
        by_pack.setdefault(ref.pack, []).append(ref)
    for pack, group in by_pack.items():
        group.sort(key=lambda r: r.offset)
        current: list[ChunkRef] = []
        start = end = 0
        for ref in group:
            if current and (
                ref.offset - end > max_gap or ref.offset + ref.length - start > max_span
            ):
                spans.append(Span(pack, start, end - start, tuple(current)))
                current = []
            if not current:
                start = ref.offset
                end = ref.offset
            current.append(ref)
            end = max(end, ref.offset + ref.length)
        if current:
            spans.append(Span(pack, start, end - start, tuple(current)))
    return spans


class TokenBucket:
    """At most `rate` bytes per second on average (0 = no cap), bursts of up to one second.
    Runs on trio's clock."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._tokens = float(rate)
        self._stamp: float | None = None

    async def take(self, amount: int) -> None:
        if self.rate <= 0:
            return
        now = trio.current_time()
        if self._stamp is not None:
            self._tokens = min(float(self.rate), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= amount
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)


#: Where a prefetched chunk goes besides the SSD cache: put(entry, chunk number, raw bytes),
#: blocking (the daemon puts it into the kernel's page cache of the mount).
PagePut = Callable[[int, int, Blob], None]


def _windows(
    index: ImageIndex, rows: np.ndarray[Any, Any]
) -> Iterator[tuple[list[ChunkRef], dict[bytes, list[tuple[int, int]]]]]:
    """The profile in windows: the distinct chunks of each, and where each one occurs."""
    seen: set[bytes] = set()
    for start in range(0, len(rows), WINDOW):
        refs = []
        places: dict[bytes, list[tuple[int, int]]] = {}
        for entry, chunk in rows[start : start + WINDOW].tolist():
            canonical = index.canonical(entry)
            ref = index.file_chunk(canonical, chunk)
            places.setdefault(ref.digest, []).append((canonical, chunk))
            if ref.digest not in seen:
                seen.add(ref.digest)
                refs.append(ref)
        yield refs, places


async def replay(
    index: ImageIndex,
    rows: np.ndarray[Any, Any],
    tiers: Tiers,
    rate: int,
    parallel: int = 4,
    put: PagePut | None = None,
    unwritten: list[tuple[ChunkRef, Blob]] | None = None,
) -> int:
    """Fetch the profile's chunks that no local tier has; returns the bytes fetched. With put,
    every fetched chunk is also given to put for each place the profile has it. With
    unwritten, fetched chunks are appended there instead of being written to the SSD cache
    on the way (the caller writes them later, off the replay's path: one cache file per chunk
    was 62% of a replay's thread time for `import torch`'s 1,500 small files)."""
    if tiers.remote is None or not len(rows):
        return 0
    started = time.monotonic()
    bucket = TokenBucket(rate)
    fetched = 0
    failed: list[BaseException] = []

    async def run(span: Span, places: dict[bytes, list[tuple[int, int]]]) -> None:
        nonlocal fetched
        if failed:
            return
        await bucket.take(span.length)

        def to_pages(ref: ChunkRef, data: Blob) -> None:
            if put is not None:
                for entry, chunk in places.get(ref.digest, ()):
                    put(entry, chunk, data)
            if unwritten is not None:
                unwritten.append((ref, data))

        try:
            got = await trio.to_thread.run_sync(
                fetch_span, tiers, span, to_pages, unwritten is None, limiter=tiers.limiter
            )
        except ImageFSError as exc:
            failed.append(exc)
            return
        fetched += got

    def not_local(refs: list[ChunkRef]) -> list[ChunkRef]:
        return [r for r in refs if not tiers.is_local(r)]

    async def one(
        span: Span, places: dict[bytes, list[tuple[int, int]]], limit: trio.Semaphore
    ) -> None:
        try:
            await run(span, places)
        finally:
            limit.release()

    for refs, places in _windows(index, rows):
        wanted = await trio.to_thread.run_sync(not_local, refs, limiter=tiers.limiter)
        wanted = [r for r in wanted if r.digest not in tiers.ram]
        async with trio.open_nursery() as nursery:
            limit = trio.Semaphore(parallel)
            for span in plan(wanted):
                await limit.acquire()
                nursery.start_soon(one, span, places, limit)
        if failed:
            logger.warning("prefetch stopped after %d bytes: %s", fetched, failed[0])
            break
    logger.info(
        "prefetched %.1f MB of %d profile rows in %.2f s",
        fetched / 1e6,
        len(rows),
        time.monotonic() - started,
    )
    return fetched


def fetch_span(
    tiers: Tiers,
    span: Span,
    accepted: Callable[[ChunkRef, Blob], None] | None = None,
    write_cache: bool = True,
) -> int:
    """One ranged GET for a span; every chunk in it verified and cached (blocking; not cached
    without write_cache), then given to accepted, if set."""
    assert tiers.remote is not None
    started = time.perf_counter()
    try:
        data = tiers.remote.get_range(f"packs/{span.pack}.pack", span.offset, span.length)
    except ImageFSError:
        tiers.metrics.remote_errors.inc()
        raise
    tiers.metrics.remote_seconds.observe(time.perf_counter() - started)
    view = memoryview(data)
    got = 0
    for ref in span.chunks:
        part = view[ref.offset - span.offset : ref.offset - span.offset + ref.length]
        try:
            data = tiers.accept_remote(ref, bytes(part), write_cache)
        except ImageFSError as exc:
            logger.warning("prefetch: %s", exc)
            continue
        if accepted is not None:
            accepted(ref, data)
        tiers.prefetched.add(ref.digest)
        tiers.metrics.prefetch_bytes.inc(ref.raw_length)
        got += ref.length
    return got
