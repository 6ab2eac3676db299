"""The image store: content-addressed packs, immutable indexes, named refs, the SSD chunk cache.

    STORE/                     0700 (every directory below too); every file 0600
      refs/<name>.json         name -> index digest, totals, the remote it came from (if pulled)
      index/<hex>              an image index (fastboot.imagefs.index), named by its BLAKE3
      packs/<hex>.pack         chunk bytes back to back, named by the BLAKE3 of the whole pack
      packs/<hex>.idx          the pack's table (digest, offset, length): dedup at build time
      cache/<hh>/<hex>         the SSD tier: one file per chunk fetched from the remote
      files/<hh>/<hex>         whole files kept for FUSE passthrough (imagefs/passthrough.py)
      profiles/<index hex>     the prefetch profile recorded at the last mount of that index
      mounts/<id>.json|.log|.prom   one running mount daemon: its record, log and metrics
      tmp/<pid>-...            files being written; renamed into place when complete

A remote store is the same tree served by any static HTTP server (refs/, index/, packs/,
profiles/), so reading one chunk from it is one ranged GET of `packs/<hex>.pack`.
Nothing is visible half-written: every file is written under tmp/, fsynced, and renamed; a ref
is written last, after the index and packs it names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastboot.errors import ImageCorruptError, ImageFSError, ImageNotFoundError, UsageError
from fastboot.host.proctree import stat_fields
from fastboot.imagefs import buffers
from fastboot.imagefs.index import CODEC_RAW, ChunkDigest, ChunkRef, ImageIndex

logger = logging.getLogger(__name__)

PACK_TABLE_DTYPE = np.dtype(
    [
        ("digest", "V32"),
        ("offset", "<u8"),
        ("length", "<u4"),
        ("raw_length", "<u4"),
        ("codec", "u1"),
    ]
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
REF_FORMAT = 1


def check_name(name: str) -> str:
    if not _NAME.match(name) or name.endswith(".json"):
        raise UsageError(
            f"image name {name!r} is not valid: use letters, digits, '.', '_' and '-' "
            "(at most 128, starting with a letter or digit)"
        )
    return name


Bytes = bytes | bytearray | memoryview


def digest_of(data: Bytes, parallel: bool = True) -> ChunkDigest:
    """BLAKE3 of `data`; big inputs on all cores unless not `parallel` (callers that already
    hash many chunks at once in threads: splitting each one across cores too only adds
    hand-offs, ~10% of a cold read's CPU in the mount daemon)."""
    import blake3

    if parallel and len(data) >= 1 << 20:
        return ChunkDigest(blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest())
    return ChunkDigest(blake3.blake3(data).digest())


def decode(ref: ChunkRef, stored: Bytes) -> Bytes:
    """The raw bytes of a chunk from its stored form (not yet verified: check the digest)."""
    if ref.codec == CODEC_RAW:
        return stored
    import zstandard

    try:
        return zstandard.ZstdDecompressor().decompress(stored, max_output_size=ref.raw_length)
    except zstandard.ZstdError as exc:
        raise ImageCorruptError(f"chunk {ref.hex[:16]}… does not decompress ({exc})") from exc


KEEP_MIN_BYTES = 64 * 1024 * 1024
"""The smallest regular file that FUSE passthrough keeps whole under files/
(fastboot/imagefs/passthrough.py)."""


def big_files(index: ImageIndex, min_bytes: int = KEEP_MIN_BYTES) -> list[int]:
    """The regular files of index that may be kept whole (at least `min_bytes`)."""
    big = np.nonzero(index.entries["size"] >= min_bytes)[0]
    return [int(e) for e in big if index.is_regular(int(e))]


def file_key(index: ImageIndex, entry: int) -> str:
    """The content address of one kept file (its name under files/): BLAKE3 over its chunk
    digests and its size."""
    import blake3

    h = blake3.blake3()
    for k in range(index.chunk_count(entry)):
        h.update(bytes(index.file_chunk(entry, k).digest))
    h.update(index.size(entry).to_bytes(8, "little"))
    return h.hexdigest()


@dataclass(frozen=True)
class ImageRef:
    """A named image: which index it is, and where it came from."""

    name: str
    index: str
    """Hex BLAKE3 of the index blob."""
    created: float
    files: int
    total_bytes: int
    """Logical size of the image's regular files."""
    stored_bytes: int
    """Bytes of the distinct chunks it references."""
    source: str = ""
    remote: str | None = None
    """Base URL it was pulled from (lazy images read missing chunks there)."""
    format: int = REF_FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], origin: str) -> ImageRef:
        try:
            ref = cls(**data)
        except TypeError as exc:
            raise ImageCorruptError(f"{origin} is not an image ref ({exc})") from exc
        if ref.format != REF_FORMAT or not _HEX.match(str(ref.index)):
            raise ImageCorruptError(f"{origin} is not a format-{REF_FORMAT} image ref")
        return ref


@dataclass(frozen=True)
class MountRecord:
    """One running mount daemon, as written by `fastboot image mount`."""

    id: str
    pid: int
    mountpoint: str
    name: str
    index: str
    log: str
    metrics_file: str
    metrics_port: int = 0
    started: float = field(default_factory=time.time)


def pid_alive(pid: int, marker: str = "fastboot.imagefs.daemon") -> bool:
    """Whether `pid` runs and its command line holds `marker` (so a reused pid doesn't count)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if marker.encode() not in cmdline:
        return False
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


class ImageStore:
    """Images under one directory (see the module docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- layout ------------------------------------------------------------------------------

    def ensure(self) -> ImageStore:
        for sub in ("", "refs", "index", "packs", "cache", "files", "profiles", "mounts", "tmp"):
            path = self.root / sub
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(path, 0o700)
        return self

    def ref_path(self, name: str) -> Path:
        return self.root / "refs" / f"{check_name(name)}.json"

    def index_path(self, digest: str) -> Path:
        return self.root / "index" / digest

    def pack_path(self, pack: str) -> Path:
        return self.root / "packs" / f"{pack}.pack"

    def pack_table_path(self, pack: str) -> Path:
        return self.root / "packs" / f"{pack}.idx"

    def cache_path(self, digest_hex: str) -> Path:
        return self.root / "cache" / digest_hex[:2] / digest_hex

    def file_path(self, key: str) -> Path:
        """A whole file written for FUSE passthrough (fastboot/imagefs/passthrough.py)."""
        return self.root / "files" / key[:2] / key

    def profile_path(self, index_digest: str) -> Path:
        return self.root / "profiles" / index_digest

    @property
    def mounts_dir(self) -> Path:
        return self.root / "mounts"

    # -- atomic writes -----------------------------------------------------------------------

    @contextlib.contextmanager
    def temp_file(
        self, final: Path, durable: bool = True, direct: bool = False
    ) -> Iterator[tuple[int, bool]]:
        """An fd to write `final`'s content into, and whether it is O_DIRECT (asked for with
        `direct`, where the filesystem has it); renamed into place (0600, fsynced if `durable`)
        on success, removed on failure."""
        tmp = self.root / "tmp" / f"{os.getpid()}-{time.monotonic_ns()}-{final.name}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        if direct:
            fd, direct = buffers.open_direct(tmp, flags)
        else:
            fd = os.open(tmp, flags | os.O_CLOEXEC, 0o600)
        try:
            yield fd, direct
            if durable:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.rename(tmp, final)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def write_atomic(
        self,
        final: Path,
        data: Bytes,
        durable: bool = True,
        pool: buffers.BufferPool | None = None,
    ) -> None:
        """Write `final` whole or not at all; with a `pool`, by O_DIRECT where possible."""
        with self.temp_file(final, durable, direct=pool is not None) as (fd, direct):
            buffers.DirectWriter(fd, direct, pool).append(data)

    # -- refs and indexes --------------------------------------------------------------------

    def write_ref(self, ref: ImageRef) -> None:
        self.write_atomic(
            self.ref_path(ref.name), json.dumps(ref.to_json(), indent=1).encode() + b"\n"
        )

    def read_ref(self, name: str) -> ImageRef:
        path = self.ref_path(name)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            known = ", ".join(r.name for r in self.list_refs()[:8]) or "none"
            raise ImageNotFoundError(
                f"no image {name!r} in {self.root} (images here: {known}); build it with "
                f"`fastboot image build SRC --name {name}` or fetch it with "
                f"`fastboot image pull {name} --remote URL`"
            ) from None
        except ValueError as exc:
            raise ImageCorruptError(
                f"image ref {path} is unreadable ({exc}); pull or build it again"
            ) from exc
        return ImageRef.from_json(data, str(path))

    def list_refs(self) -> list[ImageRef]:
        refs = []
        for path in sorted((self.root / "refs").glob("*.json")):
            try:
                refs.append(ImageRef.from_json(json.loads(path.read_bytes()), str(path)))
            except (ValueError, ImageFSError) as exc:
                logger.warning("skipping unreadable image ref %s: %s", path, exc)
        return refs

    def remove_ref(self, name: str) -> None:
        self.read_ref(name)
        self.ref_path(name).unlink()

    def load_index(self, digest: str) -> ImageIndex:
        return ImageIndex.load(self.index_path(digest), expect_digest=digest)

    # -- packs and the SSD cache --------------------------------------------------------------

    def known_chunks(self) -> dict[bytes, tuple[object, int, int, int, int]]:
        """digest -> (pack, offset, length, raw length, codec) for every chunk in local packs."""
        known: dict[bytes, tuple[object, int, int, int, int]] = {}
        for table in sorted((self.root / "packs").glob("*.idx")):
            pack = table.stem
            if not self.pack_path(pack).exists():
                continue
            rows = np.fromfile(table, dtype=PACK_TABLE_DTYPE)
            for digest, offset, length, raw_length, codec in zip(
                rows["digest"],
                rows["offset"].tolist(),
                rows["length"].tolist(),
                rows["raw_length"].tolist(),
                rows["codec"].tolist(),
                strict=True,
            ):
                known.setdefault(digest.tobytes(), (pack, offset, length, raw_length, codec))
        return known

    def has_pack(self, pack: str) -> bool:
        return self.pack_path(pack).exists()

    def read_local(self, ref: ChunkRef) -> bytes | None:
        """The chunk's bytes from a local pack, or None if the pack is not here."""
        try:
            fd = os.open(self.pack_path(ref.pack), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            return os.pread(fd, ref.length, ref.offset)
        finally:
            os.close(fd)

    def read_cached(self, digest_hex: str, pool: buffers.BufferPool | None = None) -> Bytes | None:
        """A cached chunk's bytes (into a pool buffer with O_DIRECT if `pool`), or None."""
        path = self.cache_path(digest_hex)
        if pool is not None:
            data: Bytes | None = buffers.read_whole(path, pool)
        else:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                data = None
        if data is None:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # the cache evicts by last use (mtime)
        return data

    def cache_put(
        self, digest_hex: str, data: Bytes, pool: buffers.BufferPool | None = None
    ) -> None:
        path = self.cache_path(digest_hex)
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # No fsync: every cached chunk is verified when read, so one torn by a crash is
        # refetched, and an fsync per chunk would sit on the miss path of every reader.
        # With a pool: O_DIRECT, no page-cache copy (fastboot/imagefs/buffers.py says why).
        self.write_atomic(path, data, durable=False, pool=pool)

    def drop_cached(self, digest_hex: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.cache_path(digest_hex).unlink()

    # -- mounts --------------------------------------------------------------------------------

    def mounts(self, include_dead: bool = False) -> list[MountRecord]:
        records = []
        for path in sorted(self.mounts_dir.glob("*.json")):
            try:
                record = MountRecord(**json.loads(path.read_bytes()))
            except (ValueError, TypeError, OSError):
                continue
            if include_dead or pid_alive(record.pid):
                records.append(record)
        return records

    # -- garbage collection --------------------------------------------------------------------

    def gc(self, cache_high: int | None = None, cache_low: int | None = None) -> dict[str, int]:
        """Remove what no ref and no running mount uses; trim the SSD cache by last use.

        The cache is trimmed only above `cache_high` bytes, down to `cache_low` (default 80% of
        high), and never loses a chunk of an image that is mounted now.
        """
        self.ensure()
        report = {"indexes": 0, "packs": 0, "profiles": 0, "tmp": 0, "cache_chunks": 0}
        report["cache_bytes_freed"] = 0
        live = self.mounts()
        keep_index = {r.index for r in self.list_refs()} | {m.index for m in live}
        keep_packs: set[str] = set()
        mounted_chunks: set[str] = set()
        keep_files: set[str] = set()
        """Files written for passthrough of kept images; those of mounted ones are never trimmed."""
        for digest in keep_index:
            try:
                index = self.load_index(digest)
            except ImageFSError as exc:
                logger.warning("gc: keeping everything of index %s: %s", digest[:16], exc)
                return report
            keep_packs.update(index.pack_names())
            files = {file_key(index, e) for e in big_files(index)}
            keep_files.update(files)
            if digest in {m.index for m in live}:
                mounted_chunks.update(d.tobytes().hex() for d in index.chunks["digest"])
                mounted_chunks.update(files)
        report["files"] = 0
        for path in (self.root / "files").glob("*/*"):
            if path.name not in keep_files:
                path.unlink()
                report["files"] += 1
        for path in (self.root / "index").iterdir():
            if path.name not in keep_index:
                path.unlink()
                report["indexes"] += 1
        for path in (self.root / "profiles").iterdir():
            if path.name not in keep_index:
                path.unlink()
                report["profiles"] += 1
        for path in (self.root / "packs").iterdir():
            if path.stem not in keep_packs:
                path.unlink()
                report["packs"] += path.suffix == ".pack"
        for path in (self.root / "tmp").iterdir():
            pid = path.name.split("-", 1)[0]
            if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                report["tmp"] += 1
        for path in self.mounts_dir.iterdir():
            record_id = path.name.split(".", 1)[0]
            if not any(m.id == record_id for m in live):
                path.unlink()
        if cache_high is not None:
            low = cache_low if cache_low is not None else cache_high * 8 // 10
            entries = []
            cached = [*(self.root / "cache").glob("*/*"), *(self.root / "files").glob("*/*")]
            for path in cached:
                st = path.stat()
                entries.append((st.st_mtime, st.st_size, path))
            total = sum(size for _, size, _ in entries)
            if total > cache_high:
                for _, size, path in sorted(entries):
                    if total <= low:
                        break
                    if path.name in mounted_chunks:
                        continue
                    path.unlink()
                    total -= size
                    report["cache_chunks"] += 1
                    report["cache_bytes_freed"] += size
        return report

    # -- push to a directory -----------------------------------------------------------------

    def push(self, name: str, dest: Path) -> dict[str, int]:
        """Publish image `name` into the remote store directory `dest` (served over HTTP by any
        static server). Packs go first, then the index and profile, then the ref."""
        ref = self.read_ref(name)
        index = self.load_index(ref.index)
        missing = [p for p in index.pack_names() if not self.has_pack(p)]
        if missing:
            raise ImageFSError(
                f"image {name!r} is not fully local ({len(missing)} of its packs are only on "
                f"{ref.remote or 'a remote'}); push it from the host that built it"
            )
        remote = ImageStore(dest)
        for sub in ("refs", "index", "packs", "profiles", "tmp"):
            (dest / sub).mkdir(parents=True, exist_ok=True, mode=0o755)
        copied = {"packs": 0, "bytes": 0}
        for pack in index.pack_names():
            target = remote.pack_path(pack)
            if target.exists():
                continue
            _publish_copy(self.pack_path(pack), target, dest / "tmp")
            copied["packs"] += 1
            copied["bytes"] += target.stat().st_size
        _publish_copy(self.index_path(ref.index), remote.index_path(ref.index), dest / "tmp")
        profile = self.profile_path(ref.index)
        if profile.exists():
            _publish_copy(profile, remote.profile_path(ref.index), dest / "tmp", replace=True)
        published = ImageRef(**{**ref.to_json(), "remote": None})
        body = json.dumps(published.to_json(), indent=1).encode() + b"\n"
        tmp = dest / "tmp" / f"{os.getpid()}-{name}.json"
        tmp.write_bytes(body)
        os.chmod(tmp, 0o644)
        os.rename(tmp, dest / "refs" / f"{name}.json")
        return copied


def _publish_copy(src: Path, dst: Path, tmp_dir: Path, replace: bool = False) -> None:
    """Copy an immutable file into a served directory, readable by the web server (0644: a remote
    store is what a static server publishes; a hardlink would share the local file's 0600)."""
    if dst.exists() and not replace:
        return
    tmp = tmp_dir / f"{os.getpid()}-{time.monotonic_ns()}-{dst.name}"
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.rename(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
