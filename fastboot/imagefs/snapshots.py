"""Snapshots stored as images: another host pulls one lazily and unpacks it into its store.

    # host A: the snapshot directory is a directory like any other
    fastboot image build $FASTBOOT_HOME/snapshots/<id> --name snap-<id>
    fastboot image push snap-<id> --to /srv/images
    # host B:
    fastboot image unpack-snapshot snap-<id> --remote http://A/images
    fastboot serve MODEL ...            # finds <id> in its snapshot directory and restores it

`unpack_snapshot` pulls the image's ref and index if a remote is given (no chunks), mounts it
read-only at a private temporary mountpoint, reads the manifest, copies every file the manifest
lists into a `.partial-*` directory of the snapshot store while hashing it (BLAKE3, as the
manifest's digests), and publishes the snapshot only when every size and digest matches and
the image holds no other file. The chunks were already verified against the image's index
on their way in; the manifest check proves the image is the snapshot it claims to be.

Why copy instead of restoring from the mount: `fastboot serve` verifies every snapshot file
against its manifest before a restore (CRIU would restore wrong bytes without a word), which
reads all of it anyway, and a non-lazy `criu restore` reads every pages-*.img to the end. So a
restore from the mount fetches every byte either way; copying once makes every later restore
local and keeps the daemon out of the restore path (measured in docs/imagefs.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fastboot import envs
from fastboot.errors import ImageFSError
from fastboot.imagefs.mount import MountOptions, mounted
from fastboot.imagefs.store import ImageStore
from fastboot.imagefs.sync import pull
from fastboot.snapshot.digests import DIGEST_CACHE, DigestCache
from fastboot.snapshot.store import MANIFEST, Manifest, SnapshotInvalid, Store

logger = logging.getLogger(__name__)

_ID = re.compile(r"^[0-9a-f]{8,64}$")


@dataclass(frozen=True)
class Unpacked:
    """What `unpack_snapshot` did."""

    manifest: Manifest
    path: Path
    """The published snapshot directory."""
    bytes: int
    """Bytes copied (0 when the snapshot was already there)."""
    seconds: float


def unpack_snapshot(
    name: str,
    snapshot_dir: Path | None = None,
    store: ImageStore | None = None,
    remote: str | None = None,
    options: MountOptions | None = None,
) -> Unpacked:
    """Materialise snapshot image `name` into the snapshot store at `snapshot_dir` (default
    $FASTBOOT_HOME/snapshots), verified against its manifest. Raises SnapshotInvalid when the
    image is not a snapshot or does not match its manifest, ImageFSError for image problems."""
    started = time.monotonic()
    store = (store or ImageStore(envs.image_store())).ensure()
    snapshots = Store(snapshot_dir or envs.snapshot_dir())
    if remote is not None:
        pull(store, name, remote)
    # read once to copy: nothing to keep whole for passthrough
    options = options or MountOptions(
        record=False, prefetch=False, remote=remote, passthrough=False
    )
    with tempfile.TemporaryDirectory(prefix="fastboot-unpack-") as tmp:
        point = Path(tmp) / "mnt"
        point.mkdir()
        with mounted(name, point, store, options):
            manifest = _read_manifest(name, point)
            final = snapshots.path(manifest.id)
            if final.exists():
                logger.info("snapshot %s is already in %s", manifest.id[:12], snapshots.root)
                return Unpacked(manifest, final, 0, time.monotonic() - started)
            _check_tree(name, point, manifest)
            copied = 0
            digests = DigestCache(snapshots.root / DIGEST_CACHE)
            with snapshots.partial(manifest.id) as partial:
                for rel, want in sorted(manifest.files.items()):
                    copied += _copy_checked(point / rel, partial / rel, want, manifest.id)
                published = snapshots.publish(partial, manifest, digests)
            digests.save()
    if published.files != manifest.files:  # publish re-described what landed on disk
        snapshots.remove(manifest.id)
        raise SnapshotInvalid(
            f"snapshot {manifest.id} changed while it was unpacked from image {name}; removed it"
        )
    elapsed = time.monotonic() - started
    logger.info(
        "unpacked snapshot %s from image %s: %.2f GB in %.1f s",
        manifest.id[:12],
        name,
        copied / 1e9,
        elapsed,
    )
    return Unpacked(published, snapshots.path(manifest.id), copied, elapsed)


def _read_manifest(name: str, root: Path) -> Manifest:
    try:
        manifest = Manifest.from_json(json.loads((root / MANIFEST).read_bytes()))
    except FileNotFoundError:
        raise SnapshotInvalid(
            f"image {name} is not a snapshot (no {MANIFEST} at its top); build it from a "
            "snapshot's directory: fastboot image build SNAPSHOT_DIR/<id> --name NAME"
        ) from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise SnapshotInvalid(f"image {name}: unreadable {MANIFEST} ({exc})") from exc
    if not _ID.match(manifest.id):
        raise SnapshotInvalid(f"image {name}: {manifest.id!r} is not a snapshot id")
    for rel in manifest.files:
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            raise SnapshotInvalid(f"image {name}: manifest lists a path outside it: {rel!r}")
    return manifest


def _check_tree(name: str, root: Path, manifest: Manifest) -> None:
    """Exactly the manifest's files (as `Store.verify` demands), all regular files."""
    found = set()
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            path = Path(dirpath) / filename
            rel = str(path.relative_to(root))
            if rel == MANIFEST:
                continue
            if path.is_symlink() or not path.is_file():
                raise SnapshotInvalid(f"image {name}: {rel} is not a regular file")
            found.add(rel)
    if extra := found - set(manifest.files):
        raise SnapshotInvalid(f"image {name}: files the manifest does not list {sorted(extra)[:3]}")
    if missing := set(manifest.files) - found:
        raise SnapshotInvalid(f"image {name}: manifest files missing {sorted(missing)[:3]}")


def _copy_checked(src: Path, dst: Path, want: dict[str, object], snapshot_id: str) -> int:
    """Copy src to dst (0600), hashing on the way; raises SnapshotInvalid on a mismatch."""
    import blake3

    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    size = 0
    try:
        with open(src, "rb", buffering=0) as fin:
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with open(fd, "wb", buffering=0) as fout:
                while got := fin.readinto(view):
                    hasher.update(view[:got])
                    out = view[:got]
                    while out:
                        out = out[fout.write(out) or 0 :]
                    size += got
    except OSError as exc:
        raise ImageFSError(f"could not copy {src} to {dst}: {exc}") from exc
    if size != want.get("size") or hasher.hexdigest() != want.get("blake3"):
        raise SnapshotInvalid(
            f"snapshot {snapshot_id}: {src.name} in the image does not match its manifest "
            f"({size} bytes, manifest says {want.get('size')})"
        )
    return size
