"""Build an image from a directory: scan, chunk, deduplicate, pack, index, publish.

Files of at most one chunk are stored whole; larger files in fixed-size pieces (4 MiB; 256 KiB
for ELF files, which are paged in at scattered places), or, for the names the caller lists as
content-defined (CRIU page images), in pieces cut where their pages say (imagefs/cdc.py), so
that another snapshot's equal runs of pages are equal chunks; compressed with zstd where that
pays. A
chunk whose BLAKE3 is already in the store (from any image) is referenced, not stored again. New
chunks are appended to pack files in path order (files of one directory sit together, so a
prefetch of neighbouring files coalesces into one ranged GET). The packs, then the index, then
the ref are renamed into place, so an interrupted build publishes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fastboot.errors import ImageFSError, UsageError
from fastboot.imagefs import cdc
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


Advance = Callable[[int], None]
"""Told each chunk's raw bytes as they are read (drives the progress bar)."""


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
    content_defined: tuple[str, ...] = (),
) -> ImageRef:
    """Build image `name` from directory `source` into `store` and publish its ref.

    ELF files (shared libraries, executables) get `small_chunk_size` chunks: they are mapped and
    paged in at scattered places, so small chunks fetch less around each fault. Everything
    else gets `chunk_size` chunks. With `compress`, chunks that zstd shrinks are stored
    compressed (the remote sends fewer bytes); the SSD cache keeps them raw. Files whose base
    name matches a `content_defined` pattern (cdc.PAGE_IMAGES for snapshots) are cut by
    content instead, in chunks of at most `chunk_size`.
    """
    _check_arguments(source, name, chunk_size, small_chunk_size)
    store.ensure()
    started = time.monotonic()
    tree = _Tree.scan(source)
    chunker = _Chunker(store, chunk_size, small_chunk_size, pack_size, compress)
    chunker.content_defined = content_defined
    show = sys.stderr.isatty() if progress is None else progress
    with progress_bar(show, tree.total_bytes, name) as advance:
        chunker.chunk_files(tree, advance)
    _share_hardlink_chunks(tree.entries)
    meta = _meta(tree, name, source)
    blob = _encode_index(tree, chunker, meta, chunk_size)
    ref = _publish(store, blob, meta)
    logger.info(
        "built image %s from %s in %.1f s: %d files, %.1f MB, %.1f MB new in the store",
        name,
        source,
        time.monotonic() - started,
        len(tree.regular),
        tree.total_bytes / 1e6,
        chunker.new_bytes / 1e6,
    )
    return ref


def _check_arguments(source: Path, name: str, chunk_size: int, small_chunk_size: int) -> None:
    """UsageError for anything that would fail the build later, before it writes anything."""
    check_name(name)
    if not source.is_dir():
        raise UsageError(f"{source} is not a directory; give the directory to build from")
    for size in (chunk_size, small_chunk_size):
        if size < 4096 or size & (size - 1) or size > 1 << 30:
            raise UsageError(f"chunk size {size} must be a power of two from 4K to 1G")


class _Tree:
    """The scanned directory: one index row per entry, in breadth-first order (a directory's
    children are consecutive and sorted by name, which the index's lookups rely on)."""

    FIELDS: ClassVar[list[str]] = list(ix.ENTRY_DTYPE.names or ())
    COL: ClassVar[dict[str, int]] = {f: i for i, f in enumerate(FIELDS)}

    def __init__(self) -> None:
        self.rows: list[list[int]] = []
        """The entries while scanning (a directory's child range is known only after it)."""
        self.paths: list[bytes] = []
        self.strings = _Strings()
        self.xattr_rows: list[tuple[int, int, int, int]] = []
        self.skipped = 0
        self._links: dict[tuple[int, int], int] = {}
        self.entries: np.ndarray[Any, Any] = np.zeros(0, dtype=ix.ENTRY_DTYPE)
        """The rows as the index's entry table, once scanned (the chunker fills its chunks)."""
        self.regular: list[int] = []
        """The entries whose content is stored (regular files, once per inode), in path order:
        files of one directory land next to each other in the packs."""
        self.total_bytes = 0

    @classmethod
    def scan(cls, source: Path) -> _Tree:
        """Every directory, regular file and symlink under source (others are skipped, with a
        warning)."""
        tree, col = cls(), cls.COL
        root = os.fsencode(source)
        tree.add(root, os.lstat(root), 0, b"")
        queue: deque[int] = deque([0])
        while queue:
            directory = queue.popleft()
            children = tree.children(directory)
            tree.rows[directory][col["child_start"]] = len(tree.rows)
            tree.rows[directory][col["child_count"]] = len(children)
            for child_name, st in children:
                path = os.path.join(tree.paths[directory], child_name)
                number = tree.add(path, st, directory, child_name)
                if stat.S_ISDIR(st.st_mode):
                    tree.rows[directory][col["nlink"]] += 1
                    queue.append(number)
        tree.entries = np.array([tuple(r) for r in tree.rows], dtype=ix.ENTRY_DTYPE)
        tree.regular = sorted(
            (
                i
                for i, r in enumerate(tree.rows)
                if stat.S_ISREG(r[col["mode"]]) and r[col["ino"]] == i
            ),
            key=lambda i: tree.paths[i],
        )
        tree.total_bytes = int(sum(tree.rows[i][col["size"]] for i in tree.regular))
        return tree

    def children(self, directory: int) -> list[tuple[bytes, os.stat_result]]:
        """The directory's entries that an image can hold, sorted by name."""
        found = []
        with os.scandir(self.paths[directory]) as it:
            for item in it:
                st = item.stat(follow_symlinks=False)
                if not (
                    stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)
                ):
                    self.skipped += 1
                    logger.warning("skipping %s: not a file, directory or symlink", item.path)
                    continue
                found.append((os.fsencode(item.name), st))
        return sorted(found, key=lambda c: c[0])

    def add(self, path: bytes, st: os.stat_result, parent: int, entry_name: bytes) -> int:
        """Append the row of one entry; a hard link shares its first path's inode number."""
        col, number = self.COL, len(self.rows)
        row = [0] * len(self.FIELDS)
        row[col["mode"]] = st.st_mode
        row[col["uid"]] = st.st_uid
        row[col["gid"]] = st.st_gid
        row[col["nlink"]] = 1
        row[col["ino"]] = number
        row[col["parent"]] = parent
        row[col["name_off"]], row[col["name_len"]] = self.strings.add(entry_name)
        row[col["mtime_ns"]] = st.st_mtime_ns
        if stat.S_ISREG(st.st_mode):
            row[col["size"]] = st.st_size
            if st.st_nlink > 1:
                first = self._links.setdefault((st.st_dev, st.st_ino), number)
                row[col["ino"]] = first
                if first != number:
                    self.rows[first][col["nlink"]] += 1
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            row[col["target_off"]], row[col["target_len"]] = self.strings.add(target)
            row[col["size"]] = len(target)
        elif stat.S_ISDIR(st.st_mode):
            row[col["nlink"]] = 2
        with contextlib.suppress(OSError):
            names = os.listxattr(path, follow_symlinks=False)
            row[col["xattr_start"]] = len(self.xattr_rows)
            for xname in sorted(names):
                value = os.getxattr(path, xname, follow_symlinks=False)
                xattr = (*self.strings.add(os.fsencode(xname)), *self.strings.add(value))
                self.xattr_rows.append(xattr)
            row[col["xattr_count"]] = len(self.xattr_rows) - row[col["xattr_start"]]
        self.rows.append(row)
        self.paths.append(path)
        return number


#: One chunk of the index as the build knows it: digest, pack (a PackWriter being written or
#: the name of a pack already in the store), offset, stored length, raw length, codec.
_ChunkRow = tuple[bytes, object, int, int, int, int]


class _Chunker:
    """Cuts files into chunks; a chunk the store (or this build) already has is referenced,
    a new one appended to the current pack file. Packs are renamed into place only when every
    file was chunked; on any failure they are removed."""

    def __init__(
        self,
        store: ImageStore,
        chunk_size: int,
        small_chunk_size: int,
        pack_size: int,
        compress: bool,
    ) -> None:
        self.store = store
        self.chunk_size = chunk_size
        self.small_chunk_size = small_chunk_size
        self.pack_size = pack_size
        self.compressor = _Compressor() if compress else None
        self.rows: list[_ChunkRow] = []
        self.new_bytes = 0
        """Stored bytes of the chunks this build added to the store."""
        self._known = store.known_chunks()
        self._fresh: dict[bytes, tuple[object, int, int, int, int]] = {}
        self._writers: list[PackWriter] = []
        self._buf = bytearray(max(chunk_size, small_chunk_size))
        self.content_defined: tuple[str, ...] = ()
        """Name patterns of the files cut by content (cdc.py) rather than in fixed sizes."""

    def chunk_files(self, tree: _Tree, advance: Advance) -> None:
        """Chunk every stored file of tree, filling its chunk columns in `tree.entries`; then
        rename the new packs into place (or, on any failure, remove them)."""
        entries = tree.entries
        try:
            for i in tree.regular:
                entries["chunk_start"][i] = len(self.rows)
                size = tree.rows[i][tree.COL["size"]]
                shift, count = self._chunk_file(tree.paths[i], size, advance)
                entries["chunk_shift"][i] = shift
                entries["chunk_count"][i] = count
            for writer in self._writers:
                writer.finish()
        except BaseException:
            for writer in self._writers:
                writer.abort()
            raise

    def _chunk_file(self, path: bytes, size: int, advance: Advance) -> tuple[int, int]:
        """(chunk shift, chunk count) of one file; ImageFSError if it changed meanwhile."""
        if size > self.chunk_size and cdc.content_defined(path, self.content_defined):
            return self._cut_file(path, size, advance)
        count = 0
        with open(path, "rb", buffering=0) as f:
            cs = self.small_chunk_size if f.read(4) == ELF_MAGIC else self.chunk_size
            f.seek(0)
            view = memoryview(self._buf)[:cs]
            while n := f.readinto(view):
                self.rows.append(self._chunk(view[:n]))
                count += 1
                advance(n)
        last = size - (count - 1) * cs
        if count != (size + cs - 1) // cs or (count and self.rows[-1][4] != last):
            raise ImageFSError(
                f"{os.fsdecode(path)} changed while the image was being built; "
                "build again from a directory nothing writes to"
            )
        return cs.bit_length() - 1, count

    def _cut_file(self, path: bytes, size: int, advance: Advance) -> tuple[int, int]:
        """(ix.VARIABLE, chunk count) of a file cut by content."""
        count = read = 0
        cutter = cdc.PageCutter(max_pages=self.chunk_size // cdc.PAGE)
        with open(path, "rb", buffering=0) as f:
            for piece in cdc.chunks(f, cutter=cutter):
                self.rows.append(self._chunk(piece))
                count += 1
                read += len(piece)
                advance(len(piece))
        if read != size:
            raise ImageFSError(
                f"{os.fsdecode(path)} changed while the image was being built; "
                "build again from a directory nothing writes to"
            )
        return ix.VARIABLE, count

    def _chunk(self, data: memoryview) -> _ChunkRow:
        """The row of one chunk, appending it to a pack unless the store or this build has it."""
        digest = digest_of(data)
        where = self._known.get(digest) or self._fresh.get(digest)
        if where is None:
            stored, codec = self.compressor.pack(data) if self.compressor else (data, 0)
            if not self._writers or self._writers[-1].size + len(stored) > self.pack_size:
                self._writers.append(PackWriter(self.store))
            writer = self._writers[-1]
            offset = writer.add(digest, stored, len(data), codec)
            where = self._fresh[digest] = (writer, offset, len(stored), len(data), codec)
            self.new_bytes += len(stored)
        return (digest, *where)

    def table(self) -> tuple[np.ndarray[Any, Any], list[bytes]]:
        """The index's chunk table and the pack digests its pack numbers refer to (call after
        `chunk_files`: a new pack is named only when finished)."""
        pack_names: dict[str, int] = {}
        chunks = np.zeros(len(self.rows), dtype=ix.CHUNK_DTYPE)
        for n, (chunk_digest, pack, offset, length, raw_length, codec) in enumerate(self.rows):
            pack_name = pack.name if isinstance(pack, PackWriter) else str(pack)
            assert pack_name is not None
            number = pack_names.setdefault(pack_name, len(pack_names))
            chunks[n] = (chunk_digest, number, offset, length, raw_length, codec)
        return chunks, [bytes.fromhex(p) for p in pack_names]


def _share_hardlink_chunks(entries: np.ndarray[Any, Any]) -> None:
    """Hard links share the canonical entry's chunks (and its link count)."""
    links_of = entries["ino"] != np.arange(len(entries))
    for i in np.nonzero(links_of)[0]:
        first = int(entries["ino"][i])
        for column in ("chunk_start", "chunk_count", "nlink", "chunk_shift"):
            entries[column][i] = entries[column][first]


def _meta(tree: _Tree, name: str, source: Path) -> dict[str, Any]:
    """What the index records about the build (and the ref repeats)."""
    return {
        "name": name,
        "source": str(source),
        "created": time.time(),
        "files": len(tree.regular),
        "entries": len(tree.entries),
        "total_bytes": tree.total_bytes,
        "skipped": tree.skipped,
    }


def _encode_index(tree: _Tree, chunker: _Chunker, meta: dict[str, Any], chunk_size: int) -> bytes:
    """The index blob of the scanned and chunked tree."""
    chunks, packs = chunker.table()
    return ix.encode(
        tree.entries,
        chunks,
        packs,
        bytes(tree.strings.data),
        np.array(tree.xattr_rows, dtype=ix.XATTR_DTYPE),
        meta,
        chunk_size,
    )


def _publish(store: ImageStore, blob: bytes, meta: dict[str, Any]) -> ImageRef:
    """Write the index (named by its digest), then the ref that names it: the image exists
    only once its ref does, and everything the ref names is already in place."""
    index_digest = digest_of(blob).hex()
    store.write_atomic(store.index_path(index_digest), blob)
    index = store.load_index(index_digest)
    ref = ImageRef(
        name=meta["name"],
        index=index_digest,
        created=meta["created"],
        files=meta["files"],
        total_bytes=meta["total_bytes"],
        stored_bytes=index.stored_bytes,
        source=meta["source"],
    )
    store.write_ref(ref)
    return ref


@contextlib.contextmanager
def progress_bar(show: bool, total: int, name: str) -> Iterator[Advance]:
    """An `Advance` for `total` bytes: a transient bar "building NAME" on stderr when `show`,
    else a no-op (rich is imported only when a bar is shown)."""
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
