"""The /dev/shm files an engine tree depends on, saved with its snapshot and put back on restore.

CRIU does not copy the content of shared file mappings: it lives in the file. vLLM's engine
talks to its workers through /dev/shm/psm_* segments and multiprocessing semaphores (sem.*),
and the first restored copy deletes them on exit, so a second restore found nothing
("Can't open file dev/shm/psm_..."). The files the tree has open or mapped, plus the
link_remap.* files CRIU itself leaves for unlinked-but-mapped semaphores, are copied into the
snapshot after the dump and written back (by rename, never over a live inode) before each restore.

Named semaphores are mapped under a name they no longer have: glibc creates one as a temporary
sem.XXXXXX, maps it, links it to its real name (sem.mp-...) and unlinks the temporary, so the
maps say "/dev/shm/sem.XXXXXX (deleted)" while the semaphore lives on as sem.mp-.... CRIU
remaps it (link_remap.N, the same inode) and multiprocessing unlinks the real name when the
engine exits. So a file counts under every name its inode still has, and names of one inode
are saved and put back as hard links: a restored engine finds its semaphore under its real
name (no FileNotFoundError traceback from `sem_unlink` at exit), the same semaphore it maps.
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
    """Names in /dev/shm of the files the processes have open or mapped, under whatever name
    they were opened (see the module docstring: a semaphore's mapping names a deleted one)."""
    files = set()  # (device, inode): a replica's private /dev/shm is another device
    prefix = f"{SHM}/"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                        st = os.stat(f"/proc/{pid}/fd/{fd}")
                        files.add((st.st_dev, st.st_ino))
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith(prefix):
                    major, minor = parts[3].split(":")
                    files.add((os.makedev(int(major, 16), int(minor, 16)), int(parts[4])))
    names = set()
    if files:
        for name in listing():
            with contextlib.suppress(OSError):
                st = os.stat(SHM / name, follow_symlinks=False)
                if (st.st_dev, st.st_ino) in files:
                    names.add(name)
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
    """Copy the named /dev/shm files that still exist into dest, names of one file as hard
    links of one copy; returns what was saved."""
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    saved = []
    first: dict[int, str] = {}  # inode -> the name its copy was saved under
    for name in sorted(names):
        with contextlib.suppress(FileNotFoundError):
            inode = os.stat(SHM / name).st_ino
            if inode in first:
                os.link(dest / first[inode], dest / name)
            else:
                copy_sparse(SHM / name, dest / name)
                first[inode] = name
            saved.append(name)
    return saved


def put_back(source: Path) -> list[str]:
    """Write every saved file back to /dev/shm (0600, atomically by rename), saved hard links
    as hard links; returns names."""
    placed: list[str] = []
    if not source.is_dir():
        return placed
    first: dict[int, str] = {}  # inode in source -> the name placed for it
    for path in sorted(source.iterdir()):
        tmp = SHM / f".fastboot-{os.getpid()}-{path.name}"
        inode = path.stat().st_ino
        if inode in first:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()  # left by a killed run with this pid
            os.link(SHM / first[inode], tmp)
        else:
            copy_sparse(path, tmp)
            os.chmod(tmp, 0o600)
            first[inode] = path.name
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
