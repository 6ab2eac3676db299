"""Snapshots published to a remote image store and restored from it before they are local.

    # host A: publish a verified snapshot (image + record) into a directory nginx serves
    fastboot snapshot push ID --to /srv/images
    # host B, which has never seen it: restore straight from the remote, lazily
    fastboot serve MODEL [flags] --fastboot-snapshot-remote http://A/images

**One chain of trust.** `push` verifies the snapshot against its manifest, builds it as an image
(`snap-<id>`) and writes `snapshots/<id>.json` beside the image store's layout: the manifest
and the digest of the image's index. A host that lacks the snapshot fetches that record, then
the index, and refuses an index whose BLAKE3 is not the one the record names; the index names
the BLAKE3 of every chunk, and the mount's daemon checks each chunk as it arrives (a bad one is
EIO, never served, never cached). So a restore from the mount needs no whole-file re-hash:
what is checked up front is the record, the index, that the index holds exactly the manifest's
files with their sizes, and that the image's own manifest.json is the record's manifest; every
other byte is checked on the fly. The binding of manifest digests to chunk digests is made once,
by `push`, on the host that verified the files.

**Restore from the mount.** The image is mounted at its stable path (`SharedMount`, the same
users-counted mount as weights and env images) and CRIU restores from it. With fastboot's CRIU
(`--mmap-page-image`) the page images are mapped copy-on-write from the mount, so only the pages
the restore and the first requests touch are fetched; the rest arrive when touched or when the
background fetch (`fetch_rest`) brings them into the SSD cache. A mapped replica reads the mount
for its whole life: the mount stays until the last replica using it has exited.

**Trust of the record.** The record comes from the configured remote, as an image ref does: it
is the root, like a registry tag. What the chain guarantees is that the restored process gets
exactly the bytes the publisher verified, or none.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastboot.errors import ImageCorruptError, ImageFSError
from fastboot.imagefs import cdc
from fastboot.imagefs.build import build
from fastboot.imagefs.index import CODEC_RAW, DEFAULT_CHUNK_SIZE, ChunkRef, ImageIndex
from fastboot.imagefs.mount import MountOptions
from fastboot.imagefs.prefetch import MAX_SPAN, Span, plan
from fastboot.imagefs.remote import RemoteClient
from fastboot.imagefs.shared import SharedMount
from fastboot.imagefs.store import ImageRef, ImageStore, digest_of
from fastboot.snapshot.digests import DIGEST_CACHE, DigestCache
from fastboot.snapshot.store import MANIFEST, Manifest, SnapshotInvalid, Store

logger = logging.getLogger(__name__)

#: Version of the snapshots/<id>.json record.
RECORD_FORMAT = 1


def image_name(snapshot_id: str) -> str:
    """The image a snapshot is published as."""
    return f"snap-{snapshot_id}"


def record_path(snapshot_id: str) -> str:
    """Where a remote store keeps a snapshot's record, relative to its base."""
    return f"snapshots/{snapshot_id}.json"


@dataclass(frozen=True)
class Pushed:
    """What `push` published."""

    manifest: Manifest
    index: str
    """Hex BLAKE3 of the image's index: the record names it."""
    image_bytes: int
    """Bytes of the snapshot's files."""
    stored_bytes: int
    """Bytes of its distinct chunks as stored (compressed)."""
    new_stored_bytes: int
    """Bytes this push added to the local store's packs: what other snapshots did not share."""
    seconds: float


def _pack_bytes(store: ImageStore) -> int:
    packs = store.root / "packs"
    return sum(p.stat().st_size for p in packs.glob("*.pack")) if packs.is_dir() else 0


def push(snapshots: Store, snapshot_id: str, images: ImageStore, dest: Path) -> Pushed:
    """Verify snapshot_id, build it as an image in images, publish image and record into the
    remote store directory dest. The record lands last, by rename: a reader never sees a record
    whose image is not all there."""
    started = time.monotonic()
    digests = DigestCache(snapshots.root / DIGEST_CACHE)
    manifest = snapshots.verify(snapshot_id, digests)
    digests.save()
    images.ensure()
    before = _pack_bytes(images)
    ref = build(
        images,
        snapshots.path(snapshot_id),
        image_name(snapshot_id),
        progress=False,
        content_defined=cdc.PAGE_IMAGES,
    )
    added = _pack_bytes(images) - before
    # The files were verified just before the build read them, and published snapshots are
    # immutable; this binds the manifest's digests to the index's chunk digests.
    check_index_files(images.load_index(ref.index), manifest)
    images.push(ref.name, dest)
    record = {
        "format": RECORD_FORMAT,
        "manifest": manifest.to_json(),
        "image": {"name": ref.name, "index": ref.index},
    }
    (dest / "snapshots").mkdir(mode=0o755, exist_ok=True)
    tmp = dest / "tmp" / f"{os.getpid()}-{snapshot_id}.json"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.chmod(tmp, 0o644)
    os.rename(tmp, dest / record_path(snapshot_id))
    logger.info(
        "pushed snapshot %s as image %s: %.2f GB of files, %.2f GB stored, %.2f GB new",
        snapshot_id[:12],
        ref.name,
        manifest.total_bytes / 1e9,
        ref.stored_bytes / 1e9,
        added / 1e9,
    )
    return Pushed(
        manifest, ref.index, ref.total_bytes, ref.stored_bytes, added, time.monotonic() - started
    )


def check_index_files(index: ImageIndex, manifest: Manifest) -> None:
    """The index holds exactly the manifest's files (plus manifest.json), each a regular file of
    the manifest's size; SnapshotInvalid saying which otherwise."""
    found: dict[str, int] = {}
    for entry in range(1, len(index)):
        if index.is_regular(entry):
            found[index.path(entry).lstrip("/")] = index.size(entry)
    found.pop(MANIFEST, None)
    want = {rel: int(info["size"]) for rel, info in manifest.files.items()}
    if missing := set(want) - set(found):
        raise SnapshotInvalid(f"snapshot {manifest.id}: image lacks {sorted(missing)[:3]}")
    if extra := set(found) - set(want):
        raise SnapshotInvalid(f"snapshot {manifest.id}: image has unlisted {sorted(extra)[:3]}")
    if wrong := [rel for rel in want if found[rel] != want[rel]]:
        raise SnapshotInvalid(f"snapshot {manifest.id}: sizes differ from the manifest {wrong[:3]}")


@dataclass(frozen=True)
class Record:
    """A remote snapshot's record, checked: its manifest and image."""

    manifest: Manifest
    name: str
    index: str


def fetch_record(client: RemoteClient, snapshot_id: str) -> Record | None:
    """The remote's record of snapshot_id, None when it has none; SnapshotInvalid when it is
    malformed or names another snapshot. Raises ImageFSError when the remote cannot be read."""
    body = client.get(record_path(snapshot_id), missing_ok=True)
    if body is None:
        return None
    origin = client.url(record_path(snapshot_id))
    try:
        data = json.loads(body)
        manifest = Manifest.from_json(data["manifest"])
        name, index = str(data["image"]["name"]), str(data["image"]["index"])
    except (ValueError, TypeError, KeyError) as exc:
        raise SnapshotInvalid(f"{origin} is not a snapshot record ({exc})") from exc
    if data.get("format") != RECORD_FORMAT:
        raise SnapshotInvalid(f"{origin}: record format {data.get('format')!r}")
    if manifest.id != snapshot_id or name != image_name(snapshot_id):
        raise SnapshotInvalid(f"{origin} describes snapshot {manifest.id} ({name})")
    if len(index) != 64 or any(c not in "0123456789abcdef" for c in index):
        raise SnapshotInvalid(f"{origin}: {index!r} is not an index digest")
    return Record(manifest, name, index)


def fetch_index(store: ImageStore, client: RemoteClient, record: Record) -> ImageIndex:
    """The index the record names, from the local store or the remote, refused unless its
    BLAKE3 is the record's; it is stored and a ref written (lazy: remote = the client's base)."""
    path = store.index_path(record.index)
    if path.exists():
        blob = path.read_bytes()
    else:
        got = client.get(f"index/{record.index}")
        assert got is not None
        blob = bytes(got)
    if digest_of(blob).hex() != record.index:
        raise ImageCorruptError(
            f"refusing snapshot {record.manifest.id}: its image index on {client.base_url} does "
            f"not match the digest its record names ({record.index[:16]})"
        )
    index = ImageIndex(blob, origin=client.url(f"index/{record.index}"))
    if not path.exists():
        store.write_atomic(path, blob)
    profile = client.get(f"profiles/{record.index}", missing_ok=True)
    if profile is not None and not store.profile_path(record.index).exists():
        store.write_atomic(store.profile_path(record.index), profile)
    store.write_ref(
        ImageRef(
            name=record.name,
            index=record.index,
            created=time.time(),
            files=sum(1 for e in range(1, len(index)) if index.is_regular(e)),
            total_bytes=index.total_bytes,
            stored_bytes=index.stored_bytes,
            source=client.url(record_path(record.manifest.id)),
            remote=client.base_url,
        )
    )
    return index


@dataclass
class MountedSnapshot:
    """A remote snapshot mounted here: restore from `path`; `release()` after every engine
    restored from it has exited."""

    manifest: Manifest
    path: Path
    mount: SharedMount
    index: ImageIndex
    remote: str
    seconds: float
    """Record, index, checks and mount."""
    mounted: bool = True
    _fetch: threading.Thread | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fetch_rest(self) -> None:
        """Bring every chunk into the SSD cache in the background (verified), so that replicas
        mapped from the mount stop depending on the remote; failures are logged. Once: later
        calls do nothing. Called after the first restore answered, so that it does not compete
        with that restore for the network and the cores."""
        with self._lock:
            if self._fetch is not None:
                return
            self._fetch = threading.Thread(
                target=self._fetch_all, name="fetch-snapshot", daemon=True
            )
        self._fetch.start()

    def _fetch_all(self) -> None:
        from fastboot.imagefs.sync import fetch_all  # sync imports lazy tiers: only when used

        client = RemoteClient(self.remote)
        started = time.monotonic()
        try:
            got = fetch_all(self.mount.store, self.index, client, progress=False)
            logger.info(
                "snapshot %s is all local: %.2f GB fetched in the background in %.1f s",
                self.manifest.id[:12],
                got / 1e9,
                time.monotonic() - started,
            )
        except (ImageFSError, OSError) as exc:
            logger.warning(
                "background fetch of snapshot %s stopped: %s", self.manifest.id[:12], exc
            )
        finally:
            client.close()

    def release(self) -> None:
        self.mount.release()


def open_lazy(snapshot_id: str, remote: str, store: ImageStore) -> MountedSnapshot | None:
    """Mount remote snapshot snapshot_id for a restore, every check of the chain of trust done
    (module docstring); None when the remote has no such snapshot. Raises SnapshotInvalid or
    ImageFSError (a refused index, a remote that cannot be read, a mount that fails)."""
    with contextlib.closing(RemoteClient(remote)) as client:
        record = fetch_record(client, snapshot_id)
    return None if record is None else mount_recorded(record, remote, store)


def mount_recorded(record: Record, remote: str, store: ImageStore) -> MountedSnapshot:
    """open_lazy() of a record already fetched."""
    started = time.monotonic()
    store.ensure()
    with contextlib.closing(RemoteClient(remote)) as client:
        index = fetch_index(store, client, record)
    check_index_files(index, record.manifest)
    # record: the restore's and first requests' reads become the image's prefetch profile
    mount = SharedMount(record.name, store, MountOptions(remote=remote, passthrough=False))
    path = mount.acquire()
    try:
        _check_image_manifest(path, record.manifest)
    except BaseException:
        mount.release()
        raise
    return MountedSnapshot(record.manifest, path, mount, index, remote, time.monotonic() - started)


#: How a missing snapshot is brought here (FASTBOOT_SNAPSHOT_FETCH; measured in
#: docs/snapshots.md "A host that never saw the snapshot"): "copy" fetches every file into the
#: snapshot store with parallel ranged GETs (zero chunks skipped) and restores it as a local
#: snapshot; "mount" restores from the mounted image, page images mapped.
FETCH_MODES = ("copy", "mount")


@dataclass
class RemoteSnapshots:
    """The remote a host restores missing snapshots from (fastboot.boot.sequence.SnapshotRemote).
    Mounts it opens are also appended to held, which its owner releases after the engines have
    stopped (a mapped replica reads its mount until it exits)."""

    url: str
    store: ImageStore
    snapshots: Store
    """Where a fetched ("copy") snapshot is published."""
    mode: str = "copy"
    held: list[Any] = field(default_factory=list)

    def open(self, snapshot_id: str) -> FetchedSnapshot | MountedSnapshot | None:
        """record() and bring(): the snapshot ready to restore, or None when the remote lacks
        it."""
        record = self.record(snapshot_id)
        return None if record is None else self.bring(record)

    def record(self, snapshot_id: str) -> Record | None:
        """The remote's record of snapshot_id (small: its manifest and index digest)."""
        with contextlib.closing(RemoteClient(self.url)) as client:
            return fetch_record(client, snapshot_id)

    def bring(self, record: Record) -> FetchedSnapshot | MountedSnapshot:
        """The recorded snapshot fetched here, or mounted (mode)."""
        if self.mode == "mount":
            lazy = mount_recorded(record, self.url, self.store)
            self.held.append(lazy.mount)
            return lazy
        return fetch_recorded(record, self.url, self.store, self.snapshots)


@dataclass
class FetchedSnapshot:
    """A remote snapshot fetched into the local snapshot store (FETCH_MODES "copy")."""

    manifest: Manifest
    path: Path
    store: Store
    seconds: float
    fetched_bytes: int
    """Bytes received from the remote (compressed chunks)."""
    mounted: bool = False
    _confirm: threading.Thread | None = field(default=None, repr=False)

    def fetch_rest(self) -> None:
        """Nothing is left to fetch; hash every file against the manifest in the background
        (fsynced first), which puts the digests in the store's cache for the next restore.
        A mismatch (the chain of trust broken) removes the snapshot, loudly."""
        if self._confirm is None:
            self._confirm = threading.Thread(target=self._hash, name="confirm", daemon=True)
            self._confirm.start()

    def _hash(self) -> None:
        for path in self.path.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        digests = DigestCache(self.store.root / DIGEST_CACHE)
        try:
            self.store.verify(self.manifest.id, digests)
            digests.save()
            logger.info(
                "fetched snapshot %s: every file matches its manifest", self.manifest.id[:12]
            )
        except SnapshotInvalid as exc:
            logger.error(
                "fetched snapshot %s is not its manifest (%s); removed it", self.manifest.id, exc
            )
            self.store.remove(self.manifest.id)

    def release(self) -> None:
        """Nothing to release: the snapshot is local."""


def fetch(
    snapshot_id: str, remote: str, store: ImageStore, snapshots: Store
) -> FetchedSnapshot | None:
    """Fetch remote snapshot snapshot_id into snapshots, every chunk verified against the index
    its record names (refused as open_lazy refuses), and publish it; None when the remote has no
    such snapshot. Nothing partial is ever published: any error removes what was written."""
    with contextlib.closing(RemoteClient(remote)) as client:
        record = fetch_record(client, snapshot_id)
    return None if record is None else fetch_recorded(record, remote, store, snapshots)


def fetch_recorded(
    record: Record, remote: str, store: ImageStore, snapshots: Store, threads: int = 8
) -> FetchedSnapshot:
    """fetch() of a record already fetched."""
    started, snapshot_id = time.monotonic(), record.manifest.id
    store.ensure()
    with contextlib.closing(RemoteClient(remote)) as client:
        index = fetch_index(store, client, record)
        check_index_files(index, record.manifest)
        got = 0
        if not snapshots.path(snapshot_id).exists():  # else another fetch published it
            with snapshots.partial(record.manifest.id) as partial:
                got = _fetch_files(index, client, partial, threads)
                snapshots.publish(partial, record.manifest, fetched=True)
            _start_reading(snapshots.path(snapshot_id))
    seconds = time.monotonic() - started
    logger.info(
        "fetched snapshot %s from %s: %.2f GB of files, %.2f GB received, in %.2f s",
        snapshot_id[:12],
        remote,
        record.manifest.total_bytes / 1e9,
        got / 1e9,
        seconds,
    )
    return FetchedSnapshot(record.manifest, snapshots.path(snapshot_id), snapshots, seconds, got)


def _start_reading(root: Path) -> None:
    """Have the kernel read the fetched files into the page cache in the background while
    the restore starts (they were written with O_DIRECT, so none of them is cached): the
    restored engine's page faults then find most pages there instead of reading each from
    disk in turn. Best effort."""

    def run() -> None:
        files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
        for path in files:
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)

    threading.Thread(target=run, name="readahead", daemon=True).start()


_ZERO_DIGESTS: dict[int, bytes] = {}


def _is_zeros(ref: ChunkRef) -> bool:
    """Whether a chunk is all zeros (then a hole in the sparse file is its bytes already)."""
    if ref.raw_length not in _ZERO_DIGESTS:
        _ZERO_DIGESTS[ref.raw_length] = digest_of(bytes(ref.raw_length))
    return ref.digest == _ZERO_DIGESTS[ref.raw_length]


#: O_DIRECT needs 4 KiB-aligned buffers, offsets and lengths.
_ALIGN = 4096


class _Buffers(threading.local):
    """One receive and one chunk buffer per fetch thread, page-aligned (anonymous mmap) and
    reused: on these VMs memory touched for the first time costs a host fault per page, and a
    fresh buffer per chunk cost more system time than the fetch itself."""

    def __init__(self) -> None:
        self.span = mmap.mmap(-1, MAX_SPAN)
        self.chunk = mmap.mmap(-1, DEFAULT_CHUNK_SIZE)


def _open_direct(path: Path) -> int:
    """path created for writing with O_DIRECT (the page cache is filled by the restore's own
    reads, once); without it where the filesystem refuses it (tmpfs)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return os.open(path, flags, 0o600)


def _fetch_files(index: ImageIndex, client: RemoteClient, root: Path, threads: int) -> int:
    """Write every regular file of index but the manifest under root from verified chunks:
    sparse files, zero chunks left as holes, each distinct chunk fetched once (neighbours in
    one ranged GET, `threads` at a time) and written wherever it occurs. Returns bytes received.

    Written with O_DIRECT from reused buffers: measured on the tiny model's snapshot (1.5 GB of
    non-zero chunks), buffered writes into new page-cache pages cost 4-4.7 system CPU-s, most
    of a 3.1-3.5 s fetch on 2 cores; the restore then reads the page images once from disk."""
    places: dict[bytes, list[tuple[int, int]]] = {}
    refs: dict[bytes, ChunkRef] = {}
    fds: list[tuple[int, int]] = []
    try:
        for entry in range(1, len(index)):
            rel = index.path(entry).lstrip("/")
            if not index.is_regular(entry) or rel == MANIFEST:
                continue
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = _open_direct(path)
            fds.append((fd, index.size(entry)))
            for k in range(index.chunk_count(entry)):
                ref = index.file_chunk(entry, k)
                if not _is_zeros(ref):
                    refs.setdefault(ref.digest, ref)
                    places.setdefault(ref.digest, []).append((fd, index.chunk_offset(entry, k)))
        buffers = _Buffers()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            spans = plan(list(refs.values()))
            futures = [pool.submit(_fetch_span, client, span, places, buffers) for span in spans]
            try:
                got = sum(f.result() for f in futures)
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        for fd, size in fds:
            os.ftruncate(fd, size)  # the last chunk was written padded to a whole page
        return got
    finally:
        for fd, _ in fds:
            os.close(fd)


def _fetch_span(
    client: RemoteClient,
    span: Span,
    places: dict[bytes, list[tuple[int, int]]],
    buffers: _Buffers,
) -> int:
    if span.length > len(buffers.span):  # one chunk bigger than a span
        buffers.span = mmap.mmap(-1, span.length)
    received = memoryview(buffers.span)[: span.length]
    client.get_range(f"packs/{span.pack}.pack", span.offset, span.length, received)
    for ref in span.chunks:
        stored = received[ref.offset - span.offset : ref.offset - span.offset + ref.length]
        if ref.raw_length > len(buffers.chunk):  # an image built with bigger chunks
            buffers.chunk = mmap.mmap(-1, -(-ref.raw_length // _ALIGN) * _ALIGN)
        raw = memoryview(buffers.chunk)
        if ref.codec == CODEC_RAW:
            raw[: ref.length] = stored
            size = ref.length
        else:
            size = _decompress_into(stored, raw[: ref.raw_length], ref)
        if size != ref.raw_length or digest_of(raw[:size], parallel=False) != ref.digest:
            raise ImageCorruptError(
                f"chunk {ref.hex[:16]}… from {client.base_url}/packs/{ref.pack[:16]}… does not "
                "match its digest; nothing of the snapshot is kept. Push it to the remote again"
            )
        padded = -(-size // _ALIGN) * _ALIGN
        raw[size:padded] = bytes(padded - size)
        for fd, offset in places[ref.digest]:
            view = raw[:padded]
            while view:
                view = view[os.pwrite(fd, view, offset + padded - len(view)) :]
    return span.length


def _decompress_into(stored: memoryview, out: memoryview, ref: ChunkRef) -> int:
    """Bytes of a zstd chunk decompressed into out (at most its length)."""
    import zstandard

    filled = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(stored) as reader:
            while filled < len(out) and (got := reader.readinto(out[filled:])):
                filled += got
    except zstandard.ZstdError as exc:
        raise ImageCorruptError(f"chunk {ref.hex[:16]}… does not decompress ({exc})") from exc
    return filled


def _check_image_manifest(root: Path, manifest: Manifest) -> None:
    try:
        inside: dict[str, Any] = json.loads((root / MANIFEST).read_bytes())
    except (OSError, ValueError) as exc:
        raise SnapshotInvalid(f"snapshot {manifest.id}: unreadable {MANIFEST} ({exc})") from exc
    if inside != manifest.to_json():
        raise SnapshotInvalid(
            f"snapshot {manifest.id}: the image's {MANIFEST} is not the record's manifest"
        )
