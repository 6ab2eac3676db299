"""FUSE passthrough for image files that are wholly on local disk.

Why: a warm read of a FUSE file is copied out of the FUSE inode's page cache, which kernel 6.18
keeps in order-0 (4 KiB) folios; ext4 serves the same read from large folios, about twice as
fast (docs/imagefs.md). With passthrough (kernel >= 6.9) the daemon hands the kernel an open
backing file at open time, and every read and mmap of that open file goes straight to the
backing file: ext4's page cache, no daemon, no copy through FUSE.

How ImageFS uses it:
- A regular file of at least `min_bytes` that a reader has read to its end is *materialised*:
  its verified chunks are written, in the background, to one plain file in the store
  (`files/<key>`, 0600; the key is the BLAKE3 of the file's chunk digests and size). Files that
  are only partly read (a library the loader maps, a weights file read by mmap) stay lazy.
- A materialised file left by an earlier mount is re-verified (every chunk re-hashed against
  the index) before it is used; a mismatch deletes it and is counted as corrupt.
- An open of a materialised file, when no open of the same inode uses the page cache, registers
  the backing file (ioctl FUSE_DEV_IOC_BACKING_OPEN on the session's /dev/fuse) and answers with
  its backing id; the id is dropped when the inode's last passthrough open is released. The
  kernel refuses to mix cached and passthrough opens of one inode, so an inode stays in the mode
  its first open chose until all its opens are released.
- Anything refused (an old kernel, no CAP_SYS_ADMIN, a pyfuse3 without the patch) turns
  passthrough off for the mount, logged once; every read is then served by the daemon as before.

What it costs: the bytes of a materialised file are on disk twice (its chunks in the SSD cache
and the file); `fastboot image gc` removes files of images no ref or mount uses, and trims them
by last use with the cache. Reads of a passthrough file are not re-hashed: the file was
verified when it was written or when this mount first used it, and later changes to it (by
root, on this host) are not detected.

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

from fastboot.imagefs import buffers
from fastboot.imagefs.index import ChunkDigest, ImageIndex
from fastboot.imagefs.metrics import Metrics
from fastboot.imagefs.store import ImageStore, digest_of
from fastboot.imagefs.tiers import Tiers

logger = logging.getLogger(__name__)

#: _IOW(229, 1, struct fuse_backing_map {int32 fd; uint32 flags; uint64 padding})
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501
#: _IOW(229, 2, uint32_t)
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502
MIN_BYTES = 64 * 1024 * 1024


def supported() -> bool:
    """Whether this pyfuse3 can answer an open with a backing id (the patched build)."""
    return hasattr(pyfuse3, "get_session_fd")


def worth_it(index: ImageIndex) -> bool:
    """False for a snapshot stored as an image (a snapshot manifest at its top): CRIU reads each
    page image once per restore, straight after fastboot verified it, so keeping the files whole
    only doubled their bytes on disk and competed with the restore for the cores (measured:
    a warm restore from the mounted image took 2.86 s with it, 0.78 s without)."""
    from fastboot.snapshot.store import MANIFEST

    found = index.resolve(MANIFEST)
    return found is None or not index.is_regular(found)


def file_key(index: ImageIndex, entry: int) -> str:
    """The content address of one file: BLAKE3 over its chunk digests and its size."""
    import blake3

    h = blake3.blake3()
    for k in range(index.chunk_count(entry)):
        h.update(bytes(index.file_chunk(entry, k).digest))
    h.update(index.size(entry).to_bytes(8, "little"))
    return h.hexdigest()


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
        min_bytes: int = MIN_BYTES,
        session_fd: Callable[[], int] | None = None,
        ioctl: Callable[..., Any] = fcntl.ioctl,
    ) -> None:
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
        self._held: dict[int, _Held] = {}
        """Entries with passthrough opens now."""
        self._paths: dict[int, Path] = {}
        """Each entry's kept-file path (its key hashes every chunk digest: computed once)."""

    # -- opens -------------------------------------------------------------------------------

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
        if path is None:
            self._verify_later(entry)
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

    async def _materialise(self, entry: int) -> None:
        final = self.path(entry)
        try:
            if final.exists() and await self._verify(entry):
                return
            # Chunks just read may still be queued for the SSD cache; once written, the copy
            # below reads them from RAM or the cache instead of fetching them again.
            await self.tiers.drain()
            with self.store.temp_file(final, durable=False, direct=True) as (fd, direct):
                # O_DIRECT: a buffered 1 GiB write cost seconds of CPU here (buffers.py)
                out = buffers.DirectWriter(fd, direct, self.tiers.buffers)
                for k in range(self.index.chunk_count(entry)):
                    data = await self.tiers.get(self.index.file_chunk(entry, k), reader=False)
                    await trio.to_thread.run_sync(out.append, data)
            self._ready[entry] = final
            self.metrics.materialised_bytes.inc(self.index.size(entry))
            logger.debug("materialised %s for passthrough", self.index.path(entry))
        except Exception as exc:  # a missing chunk, a full disk: the file stays lazy
            logger.warning("could not materialise %s: %s", self.index.path(entry), exc)
        finally:
            self._busy.discard(entry)

    def _verify_later(self, entry: int) -> None:
        """A file kept by an earlier mount: check it (and write it again if it is bad)."""
        if entry in self._busy or self.tiers.nursery is None or not self.path(entry).exists():
            return
        self._busy.add(entry)
        self.tiers.nursery.start_soon(self._materialise, entry)

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
