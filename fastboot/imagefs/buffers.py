"""Reused, page-aligned chunk buffers, and O_DIRECT writes and reads of chunk files.

Why (measured on the 2-vCPU VMs fastboot is developed on, kernel 6.18, ext4): memory the guest
has not touched lately costs a host fault and a clear per page, so a cold 1 GiB read that
fetched each chunk into a new `bytearray` spent more CPU faulting in and zeroing buffers than
receiving and hashing them (1.0-1.2 CPU-s vs 0.45-0.53 CPU-s per GiB with reused buffers, 8
threads against loopback nginx). Writing chunks through the page cache was worse still: 1 GiB
of 4 MiB cache files cost 1.7-5.7 CPU-s buffered and 0.13-0.20 CPU-s with O_DIRECT (the disk
DMAs from the buffer; no page is allocated, copied or written back). Together these took a cold
read through the mount from 0.26-0.38 GB/s to about 0.9 GB/s (docs/imagefs.md).

A buffer is lent as a memoryview of its mmap and is free again once no view of it is alive: the
pool sees that from the mmap's reference count (every view holds one reference through its
managed buffer). Callers keep no bookkeeping: drop the view, or let the RAM cache evict it, and
the pool reuses the memory. The pool holds at most `max_bytes`; beyond that a buffer is lent
untracked and freed with its last view.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import sys
import threading

DIRECT_ALIGN = 4096
"""O_DIRECT wants the buffer address, length and file offset aligned to the device's logical
block (512 bytes here, 4096 on many NVMe drives): 4096 suits both."""
HUGE = 2 << 20


def round_up(n: int, to: int = DIRECT_ALIGN) -> int:
    return (n + to - 1) // to * to


class BufferPool:
    """Page-aligned buffers, per size rounded up to DIRECT_ALIGN, reused once no view is alive."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free_or_lent: dict[int, list[mmap.mmap]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, length: int) -> memoryview:
        """A writable view of exactly `length` bytes (contents undefined)."""
        capacity = round_up(max(length, 1))
        with self._lock:
            mine = self._free_or_lent.setdefault(capacity, [])
            for m in mine:
                # the list, the loop variable and getrefcount's argument: no view is alive
                if sys.getrefcount(m) == 3:
                    return memoryview(m)[:length]
            m = _anonymous(capacity)
            if self._bytes + capacity <= self.max_bytes:
                mine.append(m)
                self._bytes += capacity
            return memoryview(m)[:length]

    @property
    def held_bytes(self) -> int:
        """Bytes of buffers the pool keeps for reuse (lent or free)."""
        return self._bytes


def _anonymous(capacity: int) -> mmap.mmap:
    m = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE)
    if capacity >= HUGE:
        # One fault and one clear per 2 MiB instead of per 4 KiB when it is first touched.
        with contextlib.suppress(OSError, AttributeError):
            m.madvise(mmap.MADV_HUGEPAGE)
    return m


def padded(view: memoryview) -> memoryview | None:
    """The view grown to the end of its aligned pool buffer (for one O_DIRECT write of its
    bytes and a few beyond), or None if `view` is not the start of a pool buffer."""
    base = view.obj
    if not isinstance(base, mmap.mmap) or len(base) % DIRECT_ALIGN or not view.nbytes:
        return None
    whole = memoryview(base)
    if view.nbytes > len(base) or not _same_start(view, whole):
        return None
    return whole[: round_up(view.nbytes)]


def _same_start(a: memoryview, b: memoryview) -> bool:
    import ctypes

    if a.readonly or b.readonly or not a.c_contiguous:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(a)) == ctypes.addressof(
        ctypes.c_char.from_buffer(b)
    )


def open_direct(path: os.PathLike[str] | str, flags: int, mode: int = 0o600) -> tuple[int, bool]:
    """os.open with O_DIRECT where the filesystem has it (ext4, xfs; not tmpfs): (fd, direct)."""
    try:
        return os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC, mode), True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return os.open(path, flags | os.O_CLOEXEC, mode), False


class DirectWriter:
    """Appends to a new, empty file: O_DIRECT writes from pool buffers (other bytes are copied
    into one first), plain writes where that is not possible. `close` trims the padding of an
    unaligned last piece. A piece after an unaligned one is written plainly (only a file's last
    chunk is unaligned, so that does not happen in practice)."""

    def __init__(self, fd: int, direct: bool, pool: BufferPool | None) -> None:
        self.fd = fd
        self.direct = direct and pool is not None
        self.pool = pool
        self.length = 0

    def append(self, data: memoryview | bytes | bytearray) -> None:
        view = memoryview(data).cast("B")
        if self.direct:
            whole = padded(view)
            if whole is None:
                assert self.pool is not None
                copy = self.pool.take(view.nbytes)
                copy[:] = view
                whole = padded(copy)
            if whole is not None and self._write_direct(whole, view.nbytes):
                return
        _write_all(self.fd, view)
        self.length += view.nbytes

    def _write_direct(self, whole: memoryview, length: int) -> bool:
        try:
            written = 0
            while written < len(whole):
                written += os.write(self.fd, whole[written:])
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            written = 0
        if written < len(whole) or length % DIRECT_ALIGN:
            # Unaligned end (or a refused or short write): drop what is past the true end and go
            # on without O_DIRECT.
            self._plain()
            if written >= length:
                self.length += length
                os.ftruncate(self.fd, self.length)
                os.lseek(self.fd, self.length, os.SEEK_SET)
                return True
            os.ftruncate(self.fd, self.length)
            os.lseek(self.fd, self.length, os.SEEK_SET)
            return False
        self.length += length
        return True

    def _plain(self) -> None:
        if self.direct:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            self.direct = False


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def read_whole(path: os.PathLike[str] | str, pool: BufferPool) -> memoryview | None:
    """The file at `path` in a pool buffer, read with O_DIRECT where possible (no page-cache
    copy), or None if it does not exist. A file that changes size meanwhile comes back short or
    truncated to its first size; the caller's digest check rejects it."""
    try:
        fd, direct = open_direct(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        view = pool.take(size)
        target = (padded(view) if direct else None) or view
        got = 0
        while got < size:
            try:
                n = os.readv(fd, [target[got:]])
            except OSError as exc:
                if exc.errno != errno.EINVAL or not direct:
                    raise
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                direct = False
                target = view
                continue
            if n == 0:
                break
            got += n
        return view[: min(got, size)]
    finally:
        os.close(fd)
