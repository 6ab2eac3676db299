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

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastboot.errors import ImageCorruptError, ImageFSError
from fastboot.imagefs.build import build
from fastboot.imagefs.index import ImageIndex
from fastboot.imagefs.mount import MountOptions
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
    ref = build(images, snapshots.path(snapshot_id), image_name(snapshot_id), progress=False)
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
    _fetch: threading.Thread | None = field(default=None, repr=False)

    def fetch_rest(self) -> None:
        """Bring every chunk into the SSD cache in the background (verified), so that replicas
        mapped from the mount stop depending on the remote; failures are logged."""
        from fastboot.imagefs.sync import fetch_all  # sync imports lazy tiers: only when used

        def run() -> None:
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

        self._fetch = threading.Thread(target=run, name="fetch-snapshot", daemon=True)
        self._fetch.start()

    def release(self) -> None:
        self.mount.release()


def open_lazy(
    snapshot_id: str, remote: str, store: ImageStore, client: RemoteClient | None = None
) -> MountedSnapshot | None:
    """Mount remote snapshot snapshot_id for a restore, every check of the chain of trust done
    (module docstring); None when the remote has no such snapshot. Raises SnapshotInvalid or
    ImageFSError (a refused index, a remote that cannot be read, a mount that fails)."""
    started = time.monotonic()
    own = client is None
    client = client or RemoteClient(remote)
    try:
        record = fetch_record(client, snapshot_id)
        if record is None:
            return None
        store.ensure()
        index = fetch_index(store, client, record)
    finally:
        if own:
            client.close()
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


@dataclass
class RemoteSnapshots:
    """The remote a host restores missing snapshots from (fastboot.boot.sequence.SnapshotRemote);
    every mount it opens is also appended to held, which its owner releases after the engines
    have stopped (a mapped replica reads its mount until it exits)."""

    url: str
    store: ImageStore
    held: list[Any] = field(default_factory=list)

    def open(self, snapshot_id: str) -> MountedSnapshot | None:
        lazy = open_lazy(snapshot_id, self.url, self.store)
        if lazy is not None:
            self.held.append(lazy.mount)
        return lazy


def _check_image_manifest(root: Path, manifest: Manifest) -> None:
    try:
        inside: dict[str, Any] = json.loads((root / MANIFEST).read_bytes())
    except (OSError, ValueError) as exc:
        raise SnapshotInvalid(f"snapshot {manifest.id}: unreadable {MANIFEST} ({exc})") from exc
    if inside != manifest.to_json():
        raise SnapshotInvalid(
            f"snapshot {manifest.id}: the image's {MANIFEST} is not the record's manifest"
        )
