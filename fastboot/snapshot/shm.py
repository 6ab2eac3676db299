"""The /dev/shm files an engine tree depends on, saved with its snapshot and put back on restore.

CRIU does not copy the content of shared file mappings: it lives in the file. vLLM's engine
talks to its workers through /dev/shm/psm_* segments and multiprocessing semaphores (sem.*),
and the first restored copy deletes them on exit, so a second restore found nothing
("Can't open file dev/shm/psm_..."). The files the tree has open or mapped, plus the
link_remap.* files CRIU itself leaves for unlinked-but-mapped semaphores, are copied into the
snapshot after the dump and written back (by rename, never over a live inode) before each restore.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

SHM = Path("/dev/shm")
#: Names vLLM's processes create in /dev/shm: message queues and multiprocessing semaphores.
ENGINE_PREFIXES = ("psm_", "sem.mp-")


def referenced(pids: list[int]) -> set[str]:
    """Names of /dev/shm files the processes have open or mapped (deleted ones excluded)."""
    names = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("/dev/shm/") and not target.endswith(" (deleted)"):
                        names.add(target.removeprefix("/dev/shm/"))
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                path = parts[5].strip() if len(parts) == 6 else ""
                if path.startswith("/dev/shm/") and not path.endswith(" (deleted)"):
                    names.add(path.removeprefix("/dev/shm/"))
    return names


def listing() -> set[str]:
    return set(os.listdir(SHM))


#: Copy unit of copy_sparse; a unit of zeros becomes a hole.
_BLOCK = 1 << 20
_ZEROS = bytes(_BLOCK)


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy src to dst leaving holes where src has holes or whole blocks of zeros.

    vLLM's psm_* queues are hundreds of MB of mostly untouched zeros (420 MB for the tiny
    model): copied densely they cost disk in the snapshot, and at every restore the time and
    the tmpfs memory to write zeros back. Holes are found with SEEK_DATA/SEEK_HOLE, so a sparse
    source is not even read where it has none."""
    with open(src, "rb") as source, open(dst, "wb") as target:
        size = os.fstat(source.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                data = os.lseek(source.fileno(), offset, os.SEEK_DATA)
                hole = os.lseek(source.fileno(), data, os.SEEK_HOLE)
            except OSError:  # ENXIO: no data after offset
                break
            source.seek(data)
            position = data
            while position < hole:
                block = source.read(min(_BLOCK, hole - position))
                if not block:
                    break
                if block != _ZEROS[: len(block)]:
                    target.seek(position)
                    target.write(block)
                position += len(block)
            offset = hole
        target.truncate(size)


def save(names: set[str], dest: Path) -> list[str]:
    """Copy the named /dev/shm files that still exist into dest; returns what was saved."""
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    saved = []
    for name in sorted(names):
        with contextlib.suppress(FileNotFoundError):
            copy_sparse(SHM / name, dest / name)
            saved.append(name)
    return saved


def put_back(source: Path) -> list[str]:
    """Write every saved file back to /dev/shm (0600, atomically by rename); returns names."""
    placed: list[str] = []
    if not source.is_dir():
        return placed
    for path in sorted(source.iterdir()):
        tmp = SHM / f".fastboot-{os.getpid()}-{path.name}"
        copy_sparse(path, tmp)
        os.chmod(tmp, 0o600)
        os.rename(tmp, SHM / path.name)
        placed.append(path.name)
    return placed


def remove(names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (SHM / name).unlink()


@contextlib.contextmanager
def criu_lock() -> Iterator[None]:
    """Serialise CRIU runs on this host and clear link_remap files a killed one left behind.

    CRIU names its link remaps link_remap.<file id>; one left by a dump whose fastboot was
    SIGKILLed makes the next dump fail ("Can't link remap to /dev/shm/sem.X: File exists").
    Under this lock no other dump or restore is running, so every link_remap.* present is stale
    (restores put theirs back inside the lock and remove them before leaving it).
    """
    fd = os.open(SHM / ".fastboot-criu.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        stale = sorted(n for n in listing() if n.startswith("link_remap."))
        if stale:
            logger.info("removing %d stale CRIU link_remap files from /dev/shm", len(stale))
            remove(stale)
        yield
    finally:
        os.close(fd)
