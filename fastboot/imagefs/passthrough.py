"""FUSE passthrough for image files that are wholly on local disk.

Why: a warm read of a FUSE file is copied out of the FUSE inode's page cache, which kernel 6.18
keeps in order-0 (4 KiB) folios; ext4 serves the same read from large folios, about twice as
fast (docs/imagefs.md). With passthrough (kernel >= 6.9) the daemon hands the kernel an open
backing file at open time, and every read and mmap of that open file goes straight to the
backing file: ext4's page cache, no daemon, no copy through FUSE.

How ImageFS uses it:
- A regular file of at least `min_bytes` that a reader has read to its end is *materialised*:
  its chunks are read back through the mount (from the page cache the reader left; each one
  re-hashed) and written, in the background and with O_DIRECT, to one plain file in the store
  (`files/<key>`, 0600; the key is the BLAKE3 of the file's chunk digests and size). Files that
  are only partly read (a library the loader maps, a weights file read by mmap) stay lazy.
- Such a file read in order from its start is *streamed* (`streams`): its chunks skip the SSD
  cache, since the kept file will hold them; a stream that stops early has its chunks read back
  and cached (`keep_chunks`), and an unmount in the middle finishes from the tiers.
- A materialised file left by an earlier mount is re-verified (every chunk re-hashed against
  the index) before it is used; a mismatch deletes it and is counted as corrupt.
- An open of a materialised file, when no open of the same inode uses the page cache, registers
  the backing file (ioctl FUSE_DEV_IOC_BACKING_OPEN on the session's /dev/fuse) and answers with
  its backing id; the id is dropped when the inode's last passthrough open is released. The
  kernel refuses to mix cached and passthrough opens of one inode, so an inode stays in the mode
  its first open chose until all its opens are released.
- Anything refused (an old kernel, no CAP_SYS_ADMIN, a pyfuse3 without the patch) turns
  passthrough off for the mount, logged once; every read is then served by the daemon as before.

What it costs: a file whose chunks were cached before it was kept (read out of order, or by an
earlier version) is on disk twice, as chunks and as the file; `fastboot image gc` removes files
of images no ref or mount uses, and trims them by last use with the cache. Reads of a
passthrough file are not re-hashed: the file was verified when it was written or when this
mount first used it, and later changes to it (by root, on this host) are not detected.

pyfuse3 gains `FileInfo.backing_id`, `get_session_fd()` and `Operations.enable_passthrough`
from patches/pyfuse3-passthrough.patch (fastboot/imagefs/provision-fuse.sh builds it against
libfuse >= 3.16, whose init negotiates FUSE_PASSTHROUGH).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from fastboot.errors import ImageCorruptError
from fastboot.imagefs import buffers
from fastboot.imagefs.index import ChunkDigest, ImageIndex
from fastboot.imagefs.metrics import Metrics
from fastboot.imagefs.store import KEEP_MIN_BYTES, ImageStore, big_files, digest_of, file_key
from fastboot.imagefs.tiers import Tiers
from fastboot.snapshot.store import MANIFEST

logger = logging.getLogger(__name__)

#: _IOW(229, 1, struct fuse_backing_map {int32 fd; uint32 flags; uint64 padding})
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501
#: _IOW(229, 2, uint32_t)
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502


def supported() -> bool:
    """Whether this pyfuse3 can answer an open with a backing id (the patched build)."""
    return hasattr(pyfuse3, "get_session_fd")


def worth_it(index: ImageIndex) -> bool:
    """False for a snapshot stored as an image (a snapshot manifest at its top): CRIU reads each
    page image once per restore, straight after fastboot verified it, so keeping the files whole
    only doubled their bytes on disk and competed with the restore for the cores (measured:
    a warm restore from the mounted image took 2.86 s with it, 0.78 s without)."""
    found = index.resolve(MANIFEST)
    return found is None or not index.is_regular(found)


@dataclass
class _Held:
    """A backing file registered for an entry while it has passthrough opens."""

    backing_id: int
    fd: int
    opens: int = 1


class Passthrough:
    """Materialised files of one mounted image and the backing ids of their open inodes."""

    def __init__(
        self,
        store: ImageStore,
        index: ImageIndex,
        tiers: Tiers,
        metrics: Metrics,
        min_bytes: int = KEEP_MIN_BYTES,
        session_fd: Callable[[], int] | None = None,
        ioctl: Callable[..., Any] = fcntl.ioctl,
        mountpoint: str | None = None,
    ) -> None:
        self.mountpoint = mountpoint
        """Where this image is mounted: files are kept by reading them back through it (from
        the page cache, where a reader just left them)."""
        self.store = store
        self.index = index
        self.tiers = tiers
        self.metrics = metrics
        self.min_bytes = min_bytes
        self.enabled = supported() or session_fd is not None
        self._session_fd: Callable[[], int] = (
            session_fd if session_fd is not None else getattr(pyfuse3, "get_session_fd", _no_fd)
        )
        self._ioctl = ioctl
        self._ready: dict[int, Path] = {}
        """Entries whose materialised file is verified for this mount."""
        self._busy: set[int] = set()
        """Entries being materialised or verified."""
        self._keeping = 0
        """Background tasks caching chunks of streams that stopped early."""
        self._verifying: dict[int, trio.Event] = {}
        """Entries whose kept file an open is verifying (other opens wait for it)."""
        self._held: dict[int, _Held] = {}
        """Entries with passthrough opens now."""
        self._paths: dict[int, Path] = {}
        """Each entry's kept-file path (its key hashes every chunk digest: computed once)."""

    # -- opens -------------------------------------------------------------------------------

    def kept_entries(self) -> list[int]:
        """Entries with a kept file on disk (verified or not yet; blocking)."""
        return [e for e in big_files(self.index, self.min_bytes) if self.path(e).exists()]

    async def settle(self, entry: int) -> None:
        """Before an open of entry: a kept file left by an earlier mount is verified now, and
        the open waits for it (a streamed file's chunks are in no other local tier, so serving
        it lazily meanwhile would need the remote). A bad one is written again in the
        background and the open is served by the daemon."""
        if (
            not self.enabled
            or entry in self._ready
            or self.tiers.nursery is None
            or self.index.size(entry) < self.min_bytes
        ):
            return
        pending = self._verifying.get(entry)
        if pending is not None:
            await pending.wait()
            return
        if entry in self._busy or not await trio.to_thread.run_sync(self.path(entry).exists):
            return
        done = self._verifying[entry] = trio.Event()
        self._busy.add(entry)
        try:
            intact = await self._verify(entry)
        finally:
            self._busy.discard(entry)
            del self._verifying[entry]
            done.set()
        if not intact:
            self._busy.add(entry)
            self.tiers.nursery.start_soon(self._materialise, entry)

    def open(self, entry: int) -> int:
        """A backing id for a new open of entry (> 0), or 0: serve this open from the daemon.
        The caller must not ask while the entry has opens served from the page cache."""
        held = self._held.get(entry)
        if held is not None:
            held.opens += 1
            return held.backing_id
        if not self.enabled or self.index.size(entry) < self.min_bytes:
            return 0
        path = self._ready.get(entry)
        if path is None:  # not kept, or not verified yet (`settle` comes first)
            return 0
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # removed by gc since it was verified
            del self._ready[entry]
            return 0
        try:
            arg = bytearray(struct.pack("iIQ", fd, 0, 0))
            backing_id = int(self._ioctl(self._session_fd(), FUSE_DEV_IOC_BACKING_OPEN, arg))
        except OSError as exc:
            os.close(fd)
            self.enabled = False
            logger.warning(
                "FUSE passthrough refused (%s); the daemon serves every read of this mount "
                "(passthrough needs kernel >= 6.9, CAP_SYS_ADMIN and libfuse >= 3.16)",
                exc,
            )
            return 0
        self._held[entry] = _Held(backing_id, fd)
        self.metrics.passthrough_opens.inc()
        return backing_id

    def release(self, entry: int) -> None:
        """One passthrough open of entry ended; the last one drops its backing id."""
        held = self._held.get(entry)
        if held is None:
            return
        held.opens -= 1
        if held.opens > 0:
            return
        del self._held[entry]
        try:
            arg = bytearray(struct.pack("I", held.backing_id))
            self._ioctl(self._session_fd(), FUSE_DEV_IOC_BACKING_CLOSE, arg)
        except OSError as exc:
            logger.warning("could not drop FUSE backing id %d: %s", held.backing_id, exc)
        finally:
            os.close(held.fd)

    # -- materialising -----------------------------------------------------------------------

    def read_to_end(self, entry: int) -> None:
        """A reader reached the end of entry: materialise it in the background, once."""
        if (
            not self.enabled
            or entry in self._ready
            or entry in self._busy
            or self.index.size(entry) < self.min_bytes
            or self.tiers.nursery is None
        ):
            return
        self._busy.add(entry)
        self.tiers.nursery.start_soon(self._materialise, entry)

    def path(self, entry: int) -> Path:
        path = self._paths.get(entry)
        if path is None:
            path = self._paths[entry] = self.store.file_path(file_key(self.index, entry))
        return path

    def streams(self, entry: int) -> bool:
        """Whether a reader streaming entry from its start may leave its chunks out of the SSD
        cache: once read to the end the file is kept whole (read back from the page cache), and
        a stream that stops early has its chunks cached then (`keep_chunks`)."""
        return (
            self.enabled
            and self.mountpoint is not None
            and self.tiers.nursery is not None
            and entry not in self._ready
            and self.index.size(entry) >= self.min_bytes
        )

    def keep_chunks(self, entry: int, chunks: range) -> None:
        """Write these chunks of entry to the SSD cache in the background, reading them back
        through the mount (a stream of entry that did not reach its end)."""
        if self.tiers.nursery is None or self.mountpoint is None or not chunks:
            return
        self.tiers.nursery.start_soon(self._keep_chunks, entry, chunks)

    async def _keep_chunks(self, entry: int, chunks: range) -> None:
        self._keeping += 1
        try:
            kept = await trio.to_thread.run_sync(self._read_back, entry, chunks, None)
            logger.debug("cached %d chunks of %s read back", kept, self.index.path(entry))
        except Exception as exc:
            # unmounted meanwhile (or a page that no longer matches): from the tiers instead
            logger.debug("reading %s back failed (%s); caching from the tiers", entry, exc)
            try:
                for k in chunks:
                    ref = self.index.file_chunk(entry, k)
                    if not await trio.to_thread.run_sync(self.tiers.is_local, ref):
                        await self.tiers.get(ref, reader=False)
            except Exception as again:  # the chunks stay uncached: fetched again when read
                logger.warning("could not cache chunks of %s: %s", self.index.path(entry), again)
        finally:
            self._keeping -= 1

    async def drain(self, deadline_s: float = 60.0) -> None:
        """Wait (bounded) for files being kept and chunks being cached (at unmount)."""
        with trio.move_on_after(deadline_s):
            while self._busy or self._keeping:
                await trio.sleep(0.02)

    async def _materialise(self, entry: int) -> None:
        final = self.path(entry)
        try:
            if final.exists() and await self._verify(entry):
                return
            try:
                await self._write_kept(entry, final, from_mount=self.mountpoint is not None)
            except Exception as exc:
                # unmounted meanwhile, or evicted pages the daemon could not serve: the tiers
                logger.debug("reading %s back failed (%s); from the tiers", entry, exc)
                await self._write_kept(entry, final, from_mount=False)
            self._ready[entry] = final
            self.metrics.materialised_bytes.inc(self.index.size(entry))
            logger.debug("materialised %s for passthrough", self.index.path(entry))
        except Exception as exc:  # a missing chunk, a full disk: the file stays lazy
            logger.warning("could not materialise %s: %s", self.index.path(entry), exc)
        finally:
            self._busy.discard(entry)

    async def _write_kept(self, entry: int, final: Path, from_mount: bool) -> None:
        """Write entry's kept file from its verified chunks, read back through the mount (the
        page cache a reader left) or else from the tiers."""
        with self.store.temp_file(final, durable=False, direct=True) as (fd, direct):
            # O_DIRECT: a buffered 1 GiB write cost seconds of CPU here (buffers.py)
            out = buffers.DirectWriter(fd, direct, self.tiers.buffers)
            chunks = range(self.index.chunk_count(entry))
            if from_mount:
                await trio.to_thread.run_sync(self._read_back, entry, chunks, out)
                return
            for k in chunks:
                ref = self.index.file_chunk(entry, k)
                data = await self.tiers.get(ref, reader=False, keep=False)
                await trio.to_thread.run_sync(out.append, data)

    def _read_back(self, entry: int, chunks: range, out: buffers.DirectWriter | None) -> int:
        """Read chunks of entry through the mount (blocking, in a worker thread: a page the
        kernel no longer caches is a FUSE read this daemon answers on its loop), check each
        against the index, and append them to `out`, or else put each that is not local yet in
        the SSD cache. Returns how many chunks were written."""
        assert self.mountpoint is not None
        path = Path(self.mountpoint) / self.index.path(entry).lstrip("/")
        pool = self.tiers.buffers
        written = 0
        for k in chunks:
            ref = self.index.file_chunk(entry, k)
            if out is None and self.tiers.is_local(ref):
                continue
            data = pool.take(ref.raw_length)
            # Opened per chunk: an open file keeps the mount busy, and `fastboot image umount`
            # right after a read must not fail for this (it retries a busy unmount briefly).
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                got = os.preadv(fd, [data], self.index.chunk_offset(entry, k))
            finally:
                os.close(fd)
            if got != ref.raw_length or digest_of(data) != ChunkDigest(ref.digest):
                raise ImageCorruptError(
                    f"chunk {k} of {self.index.path(entry)!r} read back through the mount "
                    "does not match the index"
                )
            if out is not None:
                out.append(data)
            else:
                self.store.cache_put(ref.hex, data, pool)
            written += 1
        return written

    async def _verify(self, entry: int) -> bool:
        """Whether the kept file of entry is intact (then it is ready); a bad one is removed."""
        path = self.path(entry)
        if await trio.to_thread.run_sync(self._matches, entry, path):
            self._ready[entry] = path
            return True
        self.metrics.corrupt.labels("materialised").inc()
        logger.error(
            "kept file %s of %s does not match the image's digests: removed and written again "
            "from verified chunks; until then the daemon serves its reads",
            path,
            self.index.path(entry),
        )
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return False

    def _matches(self, entry: int, path: Path) -> bool:
        """Every chunk of path hashes to the index's digest (blocking)."""
        try:
            with open(path, "rb", buffering=0) as fh:
                if os.fstat(fh.fileno()).st_size != self.index.size(entry):
                    return False
                for k in range(self.index.chunk_count(entry)):
                    ref = self.index.file_chunk(entry, k)
                    data = self.tiers.buffers.take(ref.raw_length)
                    if fh.readinto(data) != ref.raw_length or digest_of(data) != ChunkDigest(
                        ref.digest
                    ):
                        return False
        except OSError:
            return False
        with contextlib.suppress(OSError):
            os.utime(path)  # gc trims by last use
        return True


def _no_fd() -> int:
    return -1
