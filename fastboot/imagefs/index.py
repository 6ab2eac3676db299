"""The immutable image index: one binary blob per image, loaded without per-file Python objects.

Layout (little-endian; every section is a packed numpy structured array or raw bytes):

    header   MAGIC (8 bytes) | version u32 | default chunk size u32 | 6 x (offset u64, length u64)
    entries  ENTRY_DTYPE[n]  one per directory entry; entry 0 is the root directory
    chunks   CHUNK_DTYPE[m]  (digest of the raw bytes, pack number, offset and length in the pack,
                             raw length, codec: 0 raw, 1 zstd); a file's chunks are contiguous:
                             entries.chunk_start .. + chunk_count, each 2**chunk_shift raw bytes
                             (the last one shorter), or, where chunk_shift is 0, each its own
                             raw length (content-defined chunks: imagefs/cdc.py)
    packs    32-byte digests of the pack files the chunks live in (chunk.pack indexes this)
    strings  names, symlink targets, xattr names and values, referenced by (offset, length)
    xattrs   XATTR_DTYPE[k]  a file's xattrs are contiguous: entries.xattr_start .. + xattr_count
    meta     JSON: what the image was built from, when, and its totals

Entries are in breadth-first order and every directory's children are contiguous and sorted by
name bytes, so `lookup` is a binary search and `readdir` a slice. Hardlinks are entries whose
`ino` names the first entry of the same file; every inode number the kernel sees is `ino + 1`
(the root is pyfuse3.ROOT_INODE == 1). The blob is stored under its own BLAKE3 digest, so a
mounted image's index never changes; `ImageIndex.load` reads it in one go (numpy views over the
bytes, no per-file Python objects) and checks every reference with vectorised numpy before
anything trusts it.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NewType

import numpy as np

from fastboot.errors import ImageCorruptError

ChunkDigest = NewType("ChunkDigest", bytes)
"""The 32-byte BLAKE3 digest of a chunk's bytes."""

MAGIC = b"FBIMGIX1"
VERSION = 2
"""2 added variable-size chunks (chunk_shift 0); 1 is read as before."""
READS_VERSIONS = (1, 2)
VARIABLE = 0
"""The chunk_shift of a file cut into content-defined chunks of varying raw lengths."""
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
SECTIONS = ("entries", "chunks", "packs", "strings", "xattrs", "meta")
_HEADER = struct.Struct("<8sII" + "QQ" * len(SECTIONS))
HEADER_SIZE = _HEADER.size

ENTRY_DTYPE = np.dtype(
    [
        ("mode", "<u4"),
        ("uid", "<u4"),
        ("gid", "<u4"),
        ("nlink", "<u4"),
        ("ino", "<u4"),
        ("parent", "<u4"),
        ("name_off", "<u8"),
        ("name_len", "<u4"),
        ("child_start", "<u4"),
        ("child_count", "<u4"),
        ("chunk_start", "<u8"),
        ("chunk_count", "<u4"),
        ("xattr_start", "<u4"),
        ("xattr_count", "<u4"),
        ("size", "<u8"),
        ("mtime_ns", "<i8"),
        ("target_off", "<u8"),
        ("target_len", "<u4"),
        ("chunk_shift", "u1"),
    ]
)
CHUNK_DTYPE = np.dtype(
    [
        ("digest", "V32"),
        ("pack", "<u4"),
        ("offset", "<u8"),
        ("length", "<u4"),
        ("raw_length", "<u4"),
        ("codec", "u1"),
    ]
)
CODEC_RAW = 0
CODEC_ZSTD = 1
PACK_DTYPE = np.dtype("V32")
XATTR_DTYPE = np.dtype(
    [("name_off", "<u8"), ("name_len", "<u4"), ("value_off", "<u8"), ("value_len", "<u4")]
)
_DTYPES = {
    "entries": ENTRY_DTYPE,
    "chunks": CHUNK_DTYPE,
    "packs": PACK_DTYPE,
    "xattrs": XATTR_DTYPE,
}


@dataclass(frozen=True)
class ChunkRef:
    """Where one chunk's bytes live: which pack, at what offset, and the digest they must match."""

    digest: ChunkDigest
    pack: str
    """Hex digest naming the pack file (`packs/<pack>.pack`)."""
    offset: int
    length: int
    """Bytes in the pack (compressed when codec is zstd)."""
    raw_length: int
    codec: int = CODEC_RAW

    @property
    def hex(self) -> str:
        return self.digest.hex()


def encode(
    entries: np.ndarray[Any, Any],
    chunks: np.ndarray[Any, Any],
    packs: list[bytes],
    strings: bytes,
    xattrs: np.ndarray[Any, Any],
    meta: dict[str, Any],
    chunk_size: int,
) -> bytes:
    """The index blob for these sections (the builder's only way to write one)."""
    bodies = [
        entries.astype(ENTRY_DTYPE, copy=False).tobytes(),
        chunks.astype(CHUNK_DTYPE, copy=False).tobytes(),
        b"".join(packs),
        strings,
        xattrs.astype(XATTR_DTYPE, copy=False).tobytes(),
        json.dumps(meta, sort_keys=True).encode(),
    ]
    table: list[int] = []
    offset = HEADER_SIZE
    out = bytearray()
    for body in bodies:
        pad = -offset % 8
        out += b"\0" * pad
        offset += pad
        table += [offset, len(body)]
        out += body
        offset += len(body)
    return _HEADER.pack(MAGIC, VERSION, chunk_size, *table) + bytes(out)


class ImageIndex:
    """A loaded index: numpy views over the bytes of one index blob."""

    def __init__(self, buffer: bytes, origin: str = "index") -> None:
        self._buffer = buffer
        self.origin = origin
        if len(buffer) < HEADER_SIZE:
            raise ImageCorruptError(
                f"{origin} is truncated ({len(buffer)} bytes, the header alone is "
                f"{HEADER_SIZE}); remove the image and build or pull it again"
            )
        magic, version, chunk_size, *table = _HEADER.unpack_from(buffer, 0)
        if magic != MAGIC:
            raise ImageCorruptError(
                f"{origin} is not a fastboot image index (magic {magic!r}); "
                "build or pull the image again"
            )
        if version not in READS_VERSIONS:
            raise ImageCorruptError(
                f"{origin} has index format {version}, this fastboot reads "
                f"{' and '.join(map(str, READS_VERSIONS))}; "
                "rebuild the image with this version"
            )
        if chunk_size <= 0:
            raise ImageCorruptError(f"{origin} has chunk size {chunk_size}; build it again")
        self.chunk_size: int = chunk_size
        sections: dict[str, memoryview] = {}
        view = memoryview(buffer)
        for i, name in enumerate(SECTIONS):
            offset, length = table[2 * i], table[2 * i + 1]
            if offset < HEADER_SIZE or offset + length > len(buffer):
                raise ImageCorruptError(
                    f"{origin} is truncated or malformed: section {name} "
                    f"[{offset}, +{length}) lies outside its {len(buffer)} bytes; "
                    "remove the image and build or pull it again"
                )
            dtype = _DTYPES.get(name)
            if dtype is not None and length % dtype.itemsize:
                raise ImageCorruptError(
                    f"{origin} is malformed: section {name} is {length} bytes, "
                    f"not a multiple of {dtype.itemsize}; build or pull the image again"
                )
            sections[name] = view[offset : offset + length]
        self.entries: np.ndarray[Any, Any] = np.frombuffer(sections["entries"], ENTRY_DTYPE)
        self.chunks: np.ndarray[Any, Any] = np.frombuffer(sections["chunks"], CHUNK_DTYPE)
        self.pack_digests: np.ndarray[Any, Any] = np.frombuffer(sections["packs"], PACK_DTYPE)
        self.xattrs: np.ndarray[Any, Any] = np.frombuffer(sections["xattrs"], XATTR_DTYPE)
        self.strings = sections["strings"]
        try:
            self.meta: dict[str, Any] = json.loads(bytes(sections["meta"]))
        except ValueError as exc:
            raise ImageCorruptError(f"{origin} has unreadable metadata ({exc})") from exc
        self._pack_hex: list[str | None] = [None] * len(self.pack_digests)
        self._starts = np.zeros(len(self.chunks) + 1, dtype=np.uint64)
        """Raw bytes before each chunk in chunk-table order: a file's chunk k starts at
        _starts[chunk_start + k] - _starts[chunk_start] (how variable-size chunks are found)."""
        np.cumsum(self.chunks["raw_length"], dtype=np.uint64, out=self._starts[1:])
        self._validate()

    @classmethod
    def load(cls, path: Path, expect_digest: str | None = None) -> ImageIndex:
        """Read the index at `path`; with `expect_digest`, check the blob's BLAKE3 first.

        One read(2) into memory rather than an mmap: the blob is read whole anyway to check
        its digest, and a mapped file that something truncates kills the daemon with SIGBUS.
        """
        try:
            with open(path, "rb", buffering=0) as f:
                buffer = f.read()
        except FileNotFoundError as exc:
            raise ImageCorruptError(
                f"index {path} is missing; pull or build the image again"
            ) from exc
        if expect_digest is not None:
            import blake3

            actual = blake3.blake3(buffer, max_threads=blake3.blake3.AUTO).hexdigest()
            if actual != expect_digest:
                raise ImageCorruptError(
                    f"index {path} does not match its digest (blake3 {actual[:16]}…, expected "
                    f"{expect_digest[:16]}…): it is corrupt or truncated; remove the image "
                    "and build or pull it again"
                )
        return cls(buffer, origin=f"index {path}")

    def _validate(self) -> None:
        e = self.entries
        n = len(e)
        bad: list[str] = []
        if n == 0 or not stat.S_ISDIR(int(e["mode"][0])):
            bad.append("no root directory")
        else:
            slen = len(self.strings)
            is_dir = (e["mode"] & 0o170000) == stat.S_IFDIR
            is_reg = (e["mode"] & 0o170000) == stat.S_IFREG
            variable = is_reg & (e["chunk_shift"] == VARIABLE)
            fixed = is_reg & ~variable
            in_table = is_reg & (e["chunk_start"] + e["chunk_count"] <= len(self.chunks))
            checks = {
                "inode": e["ino"] >= n,
                "parent": e["parent"] >= n,
                "name": e["name_off"] + e["name_len"] > slen,
                "target": e["target_off"] + e["target_len"] > slen,
                "children": is_dir & (e["child_start"].astype(np.uint64) + e["child_count"] > n),
                "chunks": is_reg & (e["chunk_start"] + e["chunk_count"] > len(self.chunks)),
                "chunk size": fixed & ((e["chunk_shift"] < 12) | (e["chunk_shift"] > 30)),
                "chunk count": fixed
                & (
                    e["chunk_count"].astype(np.uint64)
                    != (e["size"] + (np.uint64(1) << e["chunk_shift"].astype(np.uint64)) - 1)
                    >> e["chunk_shift"].astype(np.uint64)
                ),
                "chunk lengths": variable & (self._file_raw_bytes(in_table) != e["size"]),
                "xattrs": e["xattr_start"].astype(np.uint64) + e["xattr_count"] > len(self.xattrs),
            }
            bad += [
                f"{what} (entry {int(np.argmax(mask))})"
                for what, mask in checks.items()
                if mask.any()
            ]
            c = self.chunks
            if len(c) and (c["pack"] >= len(self.pack_digests)).any():
                bad.append("pack reference")
            if len(c) and ((c["codec"] > CODEC_ZSTD) | (c["raw_length"] > 1 << 30)).any():
                bad.append("chunk codec")
            if len(c) and (c["raw_length"] == 0).any():
                bad.append("empty chunk")
            x = self.xattrs
            if len(x) and (
                (x["name_off"] + x["name_len"] > slen).any()
                or (x["value_off"] + x["value_len"] > slen).any()
            ):
                bad.append("xattr strings")
        if bad:
            raise ImageCorruptError(
                f"{self.origin} is malformed (bad {', '.join(bad)}); "
                "remove the image and build or pull it again"
            )

    def _file_raw_bytes(self, ok: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Per entry, the raw bytes of its chunks (0 where ok is false: out of the table)."""
        e = self.entries
        start = np.where(ok, e["chunk_start"], 0).astype(np.int64)
        stop = start + np.where(ok, e["chunk_count"], 0).astype(np.int64)
        return self._starts[stop] - self._starts[start]

    # -- entries ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def name(self, entry: int) -> bytes:
        e = self.entries[entry]
        off = int(e["name_off"])
        return bytes(self.strings[off : off + int(e["name_len"])])

    def target(self, entry: int) -> bytes:
        e = self.entries[entry]
        off = int(e["target_off"])
        return bytes(self.strings[off : off + int(e["target_len"])])

    def canonical(self, entry: int) -> int:
        """The entry whose attributes and data a (possibly hardlinked) entry shares."""
        return int(self.entries["ino"][entry])

    def children(self, entry: int) -> range:
        e = self.entries[entry]
        start = int(e["child_start"])
        return range(start, start + int(e["child_count"]))

    def lookup(self, parent: int, name: bytes) -> int | None:
        """The child entry of directory `parent` called `name` (binary search), or None."""
        e = self.entries[parent]
        if (int(e["mode"]) & 0o170000) != stat.S_IFDIR:
            return None
        lo = int(e["child_start"])
        hi = lo + int(e["child_count"])
        offs = self.entries["name_off"]
        lens = self.entries["name_len"]
        strings = self.strings
        while lo < hi:
            mid = (lo + hi) // 2
            off = int(offs[mid])
            here = bytes(strings[off : off + int(lens[mid])])
            if here < name:
                lo = mid + 1
            elif here > name:
                hi = mid
            else:
                return mid
        return None

    def resolve(self, path: str) -> int | None:
        """The entry at a '/'-separated path relative to the root (no symlinks followed)."""
        entry = 0
        for part in path.strip("/").split("/"):
            if not part:
                continue
            found = self.lookup(entry, os.fsencode(part))
            if found is None:
                return None
            entry = found
        return entry

    def path(self, entry: int) -> str:
        parts: list[bytes] = []
        while entry != 0:
            parts.append(self.name(entry))
            entry = int(self.entries["parent"][entry])
        return "/" + os.fsdecode(b"/".join(reversed(parts)))

    def xattr_items(self, entry: int) -> list[tuple[bytes, bytes]]:
        e = self.entries[entry]
        start = int(e["xattr_start"])
        out = []
        for x in self.xattrs[start : start + int(e["xattr_count"])]:
            n, v = int(x["name_off"]), int(x["value_off"])
            out.append(
                (
                    bytes(self.strings[n : n + int(x["name_len"])]),
                    bytes(self.strings[v : v + int(x["value_len"])]),
                )
            )
        return out

    # -- chunks ------------------------------------------------------------------------------

    def pack_hex(self, pack: int) -> str:
        cached = self._pack_hex[pack]
        if cached is None:
            cached = self._pack_hex[pack] = self.pack_digests[pack].tobytes().hex()
        return cached

    def pack_names(self) -> list[str]:
        return [self.pack_hex(i) for i in range(len(self.pack_digests))]

    def chunk(self, number: int) -> ChunkRef:
        c = self.chunks[number]
        return ChunkRef(
            digest=ChunkDigest(c["digest"].tobytes()),
            pack=self.pack_hex(int(c["pack"])),
            offset=int(c["offset"]),
            length=int(c["length"]),
            raw_length=int(c["raw_length"]),
            codec=int(c["codec"]),
        )

    def file_chunk(self, entry: int, k: int) -> ChunkRef:
        """Chunk k (raw bytes [chunk_offset(entry, k), ...)) of regular file `entry`."""
        return self.chunk(int(self.entries["chunk_start"][entry]) + k)

    def chunk_offset(self, entry: int, k: int) -> int:
        """Where chunk k of regular file `entry` starts in the file (k may be chunk_count)."""
        e = self.entries[entry]
        shift = int(e["chunk_shift"])
        if shift != VARIABLE:
            return min(k << shift, int(e["size"]))
        start = int(e["chunk_start"])
        return int(self._starts[start + k] - self._starts[start])

    def chunk_at(self, entry: int, offset: int) -> int:
        """The chunk of regular file `entry` that holds byte `offset` (< its size)."""
        e = self.entries[entry]
        shift = int(e["chunk_shift"])
        if shift != VARIABLE:
            return offset >> shift
        start = int(e["chunk_start"])
        ends = self._starts[start + 1 : start + 1 + int(e["chunk_count"])]
        return int(np.searchsorted(ends, self._starts[start] + np.uint64(offset), "right"))

    def chunk_size_of(self, entry: int) -> int:
        """Raw bytes per chunk of regular file `entry` (its last chunk may be shorter); for
        content-defined chunks, the index's default chunk size, their nominal bound."""
        shift = int(self.entries["chunk_shift"][entry])
        return self.chunk_size if shift == VARIABLE else 1 << shift

    def chunk_count(self, entry: int) -> int:
        return int(self.entries["chunk_count"][entry])

    def size(self, entry: int) -> int:
        return int(self.entries["size"][entry])

    def is_regular(self, entry: int) -> bool:
        return (int(self.entries["mode"][entry]) & 0o170000) == stat.S_IFREG

    def unique_chunks(self) -> np.ndarray[Any, Any]:
        """Positions of the first reference to each distinct chunk digest."""
        if not len(self.chunks):
            return np.zeros(0, dtype=np.int64)
        _, first = np.unique(self.chunks["digest"], return_index=True)
        return np.sort(first)

    @property
    def total_bytes(self) -> int:
        """Logical size of all regular files (hardlinks counted once)."""
        e = self.entries
        own = e["ino"] == np.arange(len(e), dtype=e["ino"].dtype)
        reg = (e["mode"] & 0o170000) == stat.S_IFREG
        return int(e["size"][own & reg].sum())

    @property
    def stored_bytes(self) -> int:
        """Bytes of the distinct chunks the image references, as stored (compressed)."""
        return int(self.chunks["length"][self.unique_chunks()].astype(np.int64).sum())
