"""The read-only pyfuse3 filesystem over one image index.

Inode numbers are index positions + 1 (hardlinks share their first entry's), so nothing is
allocated per file at mount and lookup counts can be ignored (forget is a no-op). Attribute and
entry timeouts are a day and negative lookups are cached (st_ino 0): the image never changes while
mounted, and Python's import system probes many paths that do not exist. Files open with
keep_cache, so the kernel page cache answers re-reads without asking the daemon; big files that
were read whole open with a backing file instead (FUSE passthrough: imagefs/passthrough.py).

Handlers raise only pyfuse3.FUSEError: every other exception is logged with its cause and turned
into EIO (pyfuse3 would otherwise end its main loop).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import pyfuse3

from fastboot.errors import ImageFSError
from fastboot.imagefs.index import ImageIndex
from fastboot.imagefs.metrics import Metrics
from fastboot.imagefs.passthrough import Passthrough
from fastboot.imagefs.prefetch import Recorder
from fastboot.imagefs.tiers import Tiers

logger = logging.getLogger(__name__)

TIMEOUT = 24 * 3600.0
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def handler(fn: F) -> F:
    """Count the op; let FUSEError through; log anything else with its cause and answer EIO."""
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: ImageOperations, *args: Any) -> Any:
        self.metrics.ops.labels(op).inc()
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError as exc:
            self.metrics.errors.labels(op, errno.errorcode.get(exc.errno, str(exc.errno))).inc()
            raise
        except ImageFSError as exc:
            self.metrics.errors.labels(op, "EIO").inc()
            logger.error("%s%s: EIO: %s", op, _brief(args), exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        except Exception as exc:
            self.metrics.errors.labels(op, "EIO").inc()
            logger.exception("%s%s: EIO: unexpected %s", op, _brief(args), type(exc).__name__)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    return cast(F, wrapper)


def _brief(args: Sequence[Any]) -> str:
    return "(" + ", ".join(repr(a) for a in args if not isinstance(a, pyfuse3.RequestContext)) + ")"


@dataclass
class _OpenFile:
    entry: int
    next_offset: int = 0
    readahead_to: int = 0
    """First chunk not yet scheduled for readahead."""
    read_bytes: int = 0
    passthrough: bool = False
    """The kernel reads this open file from a backing file (no reads reach the daemon)."""
    streaming: bool = False
    """Read in order from its start, a big file's chunks stay out of the SSD cache (see read)."""
    unkept_to: int = 0
    """Chunks before this one were fetched while streaming (not in the SSD cache)."""
    internal: bool = False
    """Opened by this daemon (reading a file back to keep it): never streamed."""


class ImageOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        index: ImageIndex,
        tiers: Tiers,
        metrics: Metrics,
        recorder: Recorder | None,
        readahead_chunks: int,
        passthrough: Passthrough | None = None,
    ) -> None:
        super().__init__()
        self.passthrough = passthrough
        self.enable_passthrough = passthrough is not None
        self._cached_opens: dict[int, int] = {}
        """Open files per entry that the page cache serves (passthrough must wait for none)."""
        self.index = index
        self.tiers = tiers
        self.metrics = metrics
        self.recorder = recorder
        self.readahead_chunks = readahead_chunks
        self._files: dict[int, _OpenFile] = {}
        self._next_fh = 1
        self._has_xattrs = len(index.xattrs) > 0

    # -- attributes --------------------------------------------------------------------------

    def _entry(self, inode: int) -> int:
        entry = inode - 1
        if not 0 <= entry < len(self.index):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def attr(self, entry: int) -> pyfuse3.EntryAttributes:
        ino = self.index.canonical(entry)
        e = self.index.entries[ino]
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(ino + 1)
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = pyfuse3.ModeT(int(e["mode"]))
        a.st_nlink = int(e["nlink"])
        a.st_uid = int(e["uid"])
        a.st_gid = int(e["gid"])
        a.st_rdev = 0
        size = int(e["size"])
        a.st_size = size
        a.st_blksize = 128 * 1024
        a.st_blocks = (size + 511) // 512
        mtime = int(e["mtime_ns"])
        a.st_atime_ns = mtime
        a.st_mtime_ns = mtime
        a.st_ctime_ns = mtime
        return a

    @handler
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._entry(parent_inode)
        if name == b".":
            return self.attr(parent)
        if name == b"..":
            return self.attr(int(self.index.entries["parent"][parent]))
        child = self.index.lookup(parent, name)
        if child is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = pyfuse3.InodeT(0)
            negative.entry_timeout = TIMEOUT
            return negative
        return self.attr(child)

    @handler
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self.attr(self._entry(inode))

    @handler
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        entry = self._entry(inode)
        if not stat.S_ISLNK(int(self.index.entries["mode"][entry])):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self.index.target(entry)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        return None

    # -- directories -------------------------------------------------------------------------

    @handler
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        entry = self._entry(inode)
        if not stat.S_ISDIR(int(self.index.entries["mode"][entry])):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    @handler
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        # next_id is the child's position in the directory: stable, so a directory listed in
        # several calls has no duplicate or missing names.
        children = self.index.children(self._entry(fh))
        for position in range(start_id, len(children)):
            child = children[position]
            if not pyfuse3.readdir_reply(
                token, self.index.name(child), self.attr(child), position + 1
            ):
                return

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    # -- files -------------------------------------------------------------------------------

    @handler
    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        entry = self.index.canonical(self._entry(inode))
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not self.index.is_regular(entry):
            raise pyfuse3.FUSEError(errno.EISDIR)
        fh = self._next_fh
        self._next_fh += 1
        backing_id = 0
        internal = False
        if self.passthrough is not None:
            if not self._cached_opens.get(entry):
                await self.passthrough.settle(entry)
                if not self._cached_opens.get(entry):  # none came in while it verified
                    backing_id = self.passthrough.open(entry)
            internal = os.path.exists(f"/proc/self/task/{ctx.pid}")  # one of this daemon's threads
        self._files[fh] = _OpenFile(entry, passthrough=backing_id > 0, internal=internal)
        if backing_id > 0:
            # keep_cache is not allowed with passthrough: the backing file's cache is the cache
            return pyfuse3.FileInfo(
                fh=pyfuse3.FileHandleT(fh), keep_cache=False, backing_id=backing_id
            )
        self._cached_opens[entry] = self._cached_opens.get(entry, 0) + 1
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True)

    @handler
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        f = self._files.get(fh)
        if f is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        entry = f.entry
        file_size = self.index.size(entry)
        end = min(off + size, file_size)
        if off >= end:
            return b""
        cs = self.index.chunk_size_of(entry)
        first, last = self.index.chunk_at(entry, off), self.index.chunk_at(entry, end - 1)
        # The kernel may send a stream's reads slightly out of order (concurrent readahead):
        # a stream goes on with any read within a readahead window of its furthest read.
        window = self.readahead_chunks * cs
        in_stream = f.next_offset - window <= off <= f.next_offset + window
        sequential = off == f.next_offset or (f.streaming and in_stream)
        f.next_offset = max(f.next_offset, end) if f.streaming else end
        if off == 0 and f.read_bytes == 0 and self.passthrough is not None and not f.internal:
            # A big file read from its start is streamed: its chunks are not written to the SSD
            # cache while it is read (those writes halved a cold read's speed here), because
            # once read to the end it is kept whole, read back from the page cache; a stream
            # that stops early has its chunks cached then.
            f.streaming = self.passthrough.streams(entry)
        elif f.streaming and not in_stream:
            self._stop_streaming(f)
        if f.streaming:
            f.unkept_to = max(f.unkept_to, last + 1)
        if sequential and self.readahead_chunks:
            self._readahead(f, last)
        f.read_bytes += end - off
        if self.passthrough is not None and f.read_bytes >= file_size:
            self.passthrough.read_to_end(entry)
            f.streaming, f.unkept_to = False, 0
        if self.recorder is not None:
            for k in range(first, last + 1):
                self.recorder.note(entry, k)
        keep = not f.streaming
        parts = []
        for k in range(first, last + 1):
            ref = self.index.file_chunk(entry, k)
            data = await self.tiers.get(ref, keep=keep)
            at = self.index.chunk_offset(entry, k)
            parts.append(memoryview(data)[max(off - at, 0) : min(end - at, len(data))])
            if sequential and end >= at + ref.raw_length:
                # read to the chunk's end: the page cache has it now (RamCache.demote)
                self.tiers.ram.demote(ref.digest)
        out: Any = parts[0] if len(parts) == 1 else b"".join(parts)
        self.metrics.read_bytes.inc(end - off)
        # pyfuse3 takes any contiguous buffer (PyObject_GetBuffer), so a memoryview of the cached
        # chunk avoids copying it; its stub says bytes.
        return cast(bytes, out)

    def _stop_streaming(self, f: _OpenFile) -> None:
        """f left its stream before the end: cache the chunks the stream left out."""
        f.streaming = False
        if self.passthrough is not None and f.unkept_to:
            self.passthrough.keep_chunks(f.entry, range(f.unkept_to))
        f.unkept_to = 0

    def _readahead(self, f: _OpenFile, last: int) -> None:
        count = self.index.chunk_count(f.entry)
        start = max(f.readahead_to, last + 1)
        stop = min(count, last + 1 + self._readahead_depth(f.entry))
        if start >= stop:
            return
        refs = (self.index.file_chunk(f.entry, k) for k in range(start, stop))
        # chunks the fetch threads had no room for now are asked for again at the next read
        f.readahead_to = start + self.tiers.readahead(refs, keep=not f.streaming)
        if f.streaming:
            f.unkept_to = max(f.unkept_to, f.readahead_to)

    def _readahead_depth(self, entry: int) -> int:
        """Chunks to fetch ahead of a sequential reader: readahead_chunks, but never more than
        the RAM cache holds beside the chunk being read and a few read slightly out of order
        (a chunk read ahead and evicted before its reader came was fetched twice)."""
        fits = self.tiers.ram.capacity // self.index.chunk_size_of(entry) - 4
        return max(1, min(self.readahead_chunks, fits))

    @handler
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        f = self._files.pop(fh, None)
        if f is None:
            return
        if f.streaming:
            self._stop_streaming(f)
        if f.passthrough and self.passthrough is not None:
            self.passthrough.release(f.entry)
        elif self._cached_opens.get(f.entry, 0) > 1:
            self._cached_opens[f.entry] -= 1
        else:
            self._cached_opens.pop(f.entry, None)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        # ENOSYS once and the kernel sends no flush again (fc->no_flush): a read-only image has
        # nothing to flush, and `import torch` closed 1,800 files, each a round trip here.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    # -- the rest ----------------------------------------------------------------------------

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = 128 * 1024
        s.f_frsize = 4096
        s.f_blocks = (self.index.total_bytes + 4095) // 4096
        s.f_bfree = 0
        s.f_bavail = 0
        s.f_files = len(self.index)
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = 255
        return s

    @handler
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        if not self._has_xattrs:
            # ENOSYS makes the kernel stop asking for the rest of the mount.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        for key, value in self.index.xattr_items(self.index.canonical(self._entry(inode))):
            if key == name:
                return value
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @handler
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        items = self.index.xattr_items(self.index.canonical(self._entry(inode)))
        return [pyfuse3.XAttrNameT(key) for key, _ in items]
