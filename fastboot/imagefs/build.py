"""Build an image from a directory: scan, chunk, deduplicate, pack, index, publish.

Files of at most one chunk are stored whole; larger files in fixed-size pieces (4 MiB; 256 KiB
for ELF files, which are paged in at scattered places), compressed with zstd where that pays. A
chunk
whose BLAKE3 is already in the store (from any image) is referenced, not stored again. New chunks
are appended to pack files in path order (files of one directory sit together, so a prefetch of
neighbouring files coalesces into one ranged GET). The packs, then the index, then the ref are
renamed into place, so an interrupted build publishes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from fastboot.errors import ImageFSError, UsageError
from fastboot.imagefs import index as ix
from fastboot.imagefs.store import (
    PACK_TABLE_DTYPE,
    Bytes,
    ImageRef,
    ImageStore,
    check_name,
    digest_of,
)

logger = logging.getLogger(__name__)

DEFAULT_PACK_SIZE = 256 * 1024 * 1024
SMALL_CHUNK_SIZE = 256 * 1024
ELF_MAGIC = b"\x7fELF"


class PackWriter:
    """Appends chunks to one new pack file; `finish` names it by the BLAKE3 of its content."""

    def __init__(self, store: ImageStore) -> None:
        import blake3

        self.store = store
        self.size = 0
        self.rows: list[tuple[bytes, int, int, int, int]] = []
        self._hasher = blake3.blake3()
        self._tmp = store.root / "tmp" / f"{os.getpid()}-{time.monotonic_ns()}.pack"
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.name: str | None = None

    def add(self, digest: bytes, data: Bytes, raw_length: int, codec: int) -> int:
        """Append one chunk as stored (`data`, maybe compressed); returns its offset."""
        offset = self.size
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._hasher.update(data)
        self.size += len(data)
        self.rows.append((digest, offset, len(data), raw_length, codec))
        return offset

    def finish(self) -> str:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        name = str(self._hasher.hexdigest())
        table = np.array(self.rows, dtype=PACK_TABLE_DTYPE)
        self.store.write_atomic(self.store.pack_table_path(name), table.tobytes())
        os.rename(self._tmp, self.store.pack_path(name))
        self.name = name
        return name

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


class _Compressor:
    """zstd for chunks it shrinks by at least 10%; the rest (weights, media) stay raw, so
    reading them costs no decompression."""

    def __init__(self, level: int = 3) -> None:
        import zstandard

        self._zstd = zstandard.ZstdCompressor(level=level)

    def pack(self, data: memoryview) -> tuple[Bytes, int]:
        # A sample first: incompressible chunks (random weights) cost a 64 KiB attempt only.
        if len(data) > 256 * 1024:
            sample = self._zstd.compress(data[: 64 * 1024])
            if len(sample) > 0.9 * 64 * 1024:
                return data, ix.CODEC_RAW
        packed = self._zstd.compress(data)
        if len(packed) <= 0.9 * len(data):
            return packed, ix.CODEC_ZSTD
        return data, ix.CODEC_RAW


class _Strings:
    def __init__(self) -> None:
        self.data = bytearray()
        self._seen: dict[bytes, int] = {}

    def add(self, value: bytes) -> tuple[int, int]:
        off = self._seen.get(value)
        if off is None:
            off = self._seen[value] = len(self.data)
            self.data += value
        return off, len(value)


def build(
    store: ImageStore,
    source: Path,
    name: str,
    *,
    chunk_size: int = ix.DEFAULT_CHUNK_SIZE,
    small_chunk_size: int = SMALL_CHUNK_SIZE,
    compress: bool = True,
    pack_size: int = DEFAULT_PACK_SIZE,
    progress: bool | None = None,
) -> ImageRef:
    """Build image `name` from directory `source` into `store` and publish its ref.

    ELF files (shared libraries, executables) get `small_chunk_size` chunks: they are mapped and
    paged in at scattered places, so small chunks fetch less around each fault. Everything
    else gets `chunk_size` chunks. With `compress`, chunks that zstd shrinks are stored
    compressed (the remote sends fewer bytes); the SSD cache keeps them raw.
    """
    check_name(name)
    if not source.is_dir():
        raise UsageError(f"{source} is not a directory; give the directory to build from")
    for size in (chunk_size, small_chunk_size):
        if size < 4096 or size & (size - 1) or size > 1 << 30:
            raise UsageError(f"chunk size {size} must be a power of two from 4K to 1G")
    store.ensure()
    started = time.monotonic()
    fields = [name for name in ix.ENTRY_DTYPE.names or ()]
    rows: list[list[int]] = []
    paths: list[bytes] = []
    strings = _Strings()
    xattr_rows: list[tuple[int, int, int, int]] = []
    links: dict[tuple[int, int], int] = {}
    skipped = 0
    col = {f: i for i, f in enumerate(fields)}

    def new_entry(path: bytes, st: os.stat_result, parent: int, entry_name: bytes) -> int:
        nonlocal skipped
        number = len(rows)
        row = [0] * len(fields)
        row[col["mode"]] = st.st_mode
        row[col["uid"]] = st.st_uid
        row[col["gid"]] = st.st_gid
        row[col["nlink"]] = 1
        row[col["ino"]] = number
        row[col["parent"]] = parent
        row[col["name_off"]], row[col["name_len"]] = strings.add(entry_name)
        row[col["mtime_ns"]] = st.st_mtime_ns
        if stat.S_ISREG(st.st_mode):
            row[col["size"]] = st.st_size
            if st.st_nlink > 1:
                first = links.setdefault((st.st_dev, st.st_ino), number)
                row[col["ino"]] = first
                if first != number:
                    rows[first][col["nlink"]] += 1
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            row[col["target_off"]], row[col["target_len"]] = strings.add(target)
            row[col["size"]] = len(target)
        elif stat.S_ISDIR(st.st_mode):
            row[col["nlink"]] = 2
        with contextlib.suppress(OSError):
            names = os.listxattr(path, follow_symlinks=False)
            row[col["xattr_start"]] = len(xattr_rows)
            for xname in sorted(names):
                value = os.getxattr(path, xname, follow_symlinks=False)
                xattr_rows.append((*strings.add(os.fsencode(xname)), *strings.add(value)))
            row[col["xattr_count"]] = len(xattr_rows) - row[col["xattr_start"]]
        rows.append(row)
        paths.append(path)
        return number

    root = os.fsencode(source)
    new_entry(root, os.lstat(root), 0, b"")
    queue: deque[int] = deque([0])
    while queue:
        directory = queue.popleft()
        children = []
        with os.scandir(paths[directory]) as it:
            for item in it:
                st = item.stat(follow_symlinks=False)
                if not (
                    stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)
                ):
                    skipped += 1
                    logger.warning("skipping %s: not a file, directory or symlink", item.path)
                    continue
                children.append((os.fsencode(item.name), st))
        children.sort(key=lambda c: c[0])
        rows[directory][col["child_start"]] = len(rows)
        rows[directory][col["child_count"]] = len(children)
        for child_name, st in children:
            number = new_entry(
                os.path.join(paths[directory], child_name), st, directory, child_name
            )
            if stat.S_ISDIR(st.st_mode):
                rows[directory][col["nlink"]] += 1
                queue.append(number)

    entries = np.array([tuple(r) for r in rows], dtype=ix.ENTRY_DTYPE)
    regular = [i for i, r in enumerate(rows) if stat.S_ISREG(r[col["mode"]]) and r[col["ino"]] == i]
    regular.sort(key=lambda i: paths[i])
    total = int(sum(rows[i][col["size"]] for i in regular))

    known = store.known_chunks()
    chunk_rows: list[tuple[bytes, object, int, int, int, int]] = []
    writer: PackWriter | None = None
    writers: list[PackWriter] = []
    new_bytes = 0
    fresh: dict[bytes, tuple[object, int, int, int, int]] = {}
    show = sys.stderr.isatty() if progress is None else progress
    buf = bytearray(max(chunk_size, small_chunk_size))
    compressor = _Compressor() if compress else None
    try:
        with _progress(show, total, name) as advance:
            for i in regular:
                size = rows[i][col["size"]]
                entries["chunk_start"][i] = len(chunk_rows)
                count = 0
                with open(paths[i], "rb", buffering=0) as f:
                    cs = small_chunk_size if f.read(4) == ELF_MAGIC else chunk_size
                    f.seek(0)
                    entries["chunk_shift"][i] = cs.bit_length() - 1
                    view = memoryview(buf)[:cs]
                    while True:
                        n = f.readinto(view)
                        if not n:
                            break
                        data = view[:n]
                        digest = digest_of(data)
                        where = known.get(digest) or fresh.get(digest)
                        if where is None:
                            stored, codec = compressor.pack(data) if compressor else (data, 0)
                            if writer is None or writer.size + len(stored) > pack_size:
                                writer = PackWriter(store)
                                writers.append(writer)
                            offset = writer.add(digest, stored, n, codec)
                            where = (writer, offset, len(stored), n, codec)
                            fresh[digest] = where
                            new_bytes += len(stored)
                        chunk_rows.append((digest, *where))
                        count += 1
                        advance(n)
                if count != (size + cs - 1) // cs or (
                    count and chunk_rows[-1][4] != size - (count - 1) * cs
                ):
                    raise ImageFSError(
                        f"{os.fsdecode(paths[i])} changed while the image was being built; "
                        "build again from a directory nothing writes to"
                    )
                entries["chunk_count"][i] = count
        for w in writers:
            w.finish()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    # Hardlinks share the canonical entry's chunks.
    links_of = entries["ino"] != np.arange(len(entries))
    for i in np.nonzero(links_of)[0]:
        first = int(entries["ino"][i])
        entries["chunk_start"][i] = entries["chunk_start"][first]
        entries["chunk_count"][i] = entries["chunk_count"][first]
        entries["nlink"][i] = entries["nlink"][first]
        entries["chunk_shift"][i] = entries["chunk_shift"][first]

    pack_names: dict[str, int] = {}
    chunks = np.zeros(len(chunk_rows), dtype=ix.CHUNK_DTYPE)
    for n, (chunk_digest, pack, offset, length, raw_length, codec) in enumerate(chunk_rows):
        pack_name = pack.name if isinstance(pack, PackWriter) else str(pack)
        assert pack_name is not None
        chunks[n] = (
            chunk_digest,
            pack_names.setdefault(pack_name, len(pack_names)),
            offset,
            length,
            raw_length,
            codec,
        )
    meta: dict[str, Any] = {
        "name": name,
        "source": str(source),
        "created": time.time(),
        "files": len(regular),
        "entries": len(entries),
        "total_bytes": total,
        "skipped": skipped,
    }
    blob = ix.encode(
        entries,
        chunks,
        [bytes.fromhex(p) for p in pack_names],
        bytes(strings.data),
        np.array(xattr_rows, dtype=ix.XATTR_DTYPE),
        meta,
        chunk_size,
    )
    index_digest = digest_of(blob).hex()
    store.write_atomic(store.index_path(index_digest), blob)
    index = store.load_index(index_digest)
    ref = ImageRef(
        name=name,
        index=index_digest,
        created=meta["created"],
        files=len(regular),
        total_bytes=total,
        stored_bytes=index.stored_bytes,
        source=str(source),
    )
    store.write_ref(ref)
    logger.info(
        "built image %s from %s in %.1f s: %d files, %.1f MB, %.1f MB new in the store",
        name,
        source,
        time.monotonic() - started,
        len(regular),
        total / 1e6,
        new_bytes / 1e6,
    )
    return ref


@contextlib.contextmanager
def _progress(show: bool, total: int, name: str) -> Any:
    if not show:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(f"building {name}", total=total)
        yield lambda n: bar.advance(task, n)
