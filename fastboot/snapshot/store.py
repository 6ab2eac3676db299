"""The local snapshot store: one directory per snapshot, published atomically, verified on use.

    SNAPSHOT_DIR/
      <id>/                  0700; <id> = digest of the snapshot key
        manifest.json        0600; key parts, fingerprint, oracle, timings, per-file digests
        images/...           CRIU images
        shm/...              /dev/shm files the engine had open or mapped (their content is not
                             in CRIU's images: shared file mappings live in the file)
      .partial-<id>-<rand>/  a snapshot being written; never read, removed on the next run

A snapshot becomes visible only by rename(2) of a complete, fsynced directory, so a process
killed mid-dump leaves at most a .partial-* directory. Snapshots hold process memory (keys,
tokens): every directory is 0700 and every file 0600.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NewType

from fastboot.errors import FastbootError
from fastboot.snapshot.digests import DigestCache, file_digest
from fastboot.snapshot.fingerprint import Fingerprint

logger = logging.getLogger(__name__)

SnapshotId = NewType("SnapshotId", str)
MANIFEST = "manifest.json"
PARTIAL_PREFIX = ".partial-"
FORMAT = 1


class SnapshotInvalid(FastbootError):
    """A snapshot on disk that must not be restored (corrupt, truncated, unreadable)."""


@dataclass(frozen=True)
class Manifest:
    """Everything known about one snapshot."""

    id: SnapshotId
    key: dict[str, Any]
    """The key parts the id was derived from (engine, version, argv, model, fastboot...)."""
    fingerprint: Fingerprint
    oracle: dict[str, Any]
    """A fixed greedy request and the token ids it produced before the dump."""
    created: float
    cold_boot_s: float
    dump_s: float
    engine_argv: list[str]
    stdio_pipe: str
    """The engine's stdout/stderr pipe as CRIU saw it ("pipe:[INODE]"), re-attached on restore."""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Relative path -> {"size": bytes, "blake3": hex} for every file but the manifest."""
    format: int = FORMAT
    model_name: str = ""
    """The model name the engine serves (what clients put in "model")."""
    isolation: dict[str, Any] | None = None
    """None: taken on the host's network (`fastboot serve`). Else an isolated engine (own
    network and mount namespaces; see fastboot.snapshot.isolation): {"port": port it listens
    on inside its namespace}."""
    hooks: str | None = None
    """The --fastboot-hooks module it was taken with: every restore resumes with it."""

    @property
    def total_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "id": self.id,
            "key": self.key,
            "fingerprint": self.fingerprint.to_json(),
            "oracle": self.oracle,
            "created": self.created,
            "cold_boot_s": self.cold_boot_s,
            "dump_s": self.dump_s,
            "engine_argv": self.engine_argv,
            "stdio_pipe": self.stdio_pipe,
            "files": self.files,
            "model_name": self.model_name,
            "isolation": self.isolation,
            "hooks": self.hooks,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT:
            raise SnapshotInvalid(f"manifest format {data.get('format')!r} is not {FORMAT}")
        fields = {k: v for k, v in data.items() if k != "fingerprint"}
        return cls(**fields, fingerprint=Fingerprint.from_json(data["fingerprint"]))


def describe_files(root: Path, cache: DigestCache | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {size, blake3}} for every regular file under root except the manifest."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[str(path.relative_to(root))] = {
                "size": path.stat().st_size,
                "blake3": cache.digest(path) if cache else file_digest(path),
            }
    return files


def _lock_down(root: Path, fsync: bool = True) -> None:
    """0700 directories, 0600 files, fsynced (unless not fsync), under root (inclusive)."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o700)
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chmod(path, 0o600)
            if not fsync:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        del dirnames  # os.walk descends on its own


def _check_listing(root: Path, manifest: Manifest) -> None:
    """Exactly the manifest's files under root, each of its size; SnapshotInvalid otherwise."""
    found = {
        str(p.relative_to(root)): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST
    }
    want = {rel: int(info["size"]) for rel, info in manifest.files.items()}
    if found != want:
        wrong = sorted(set(found.items()) ^ set(want.items()))[:3]
        raise SnapshotInvalid(f"snapshot {manifest.id}: files differ from the manifest {wrong}")


class Store:
    """Snapshots under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)

    def path(self, snapshot_id: str) -> Path:
        return self.root / snapshot_id

    @contextlib.contextmanager
    def partial(self, snapshot_id: SnapshotId) -> Iterator[Path]:
        """A private directory to write a snapshot into; removed unless published."""
        self.ensure()
        self.remove_stale_partials()
        path = self.root / f"{PARTIAL_PREFIX}{snapshot_id}-{os.getpid()}-{time.monotonic_ns()}"
        path.mkdir(mode=0o700)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def publish(
        self,
        partial: Path,
        manifest: Manifest,
        cache: DigestCache | None = None,
        *,
        fetched: bool = False,
    ) -> Manifest:
        """Lock down, describe and atomically move a complete snapshot into place. The digests
        go into cache too (taken after the last chmod, so the next restore finds them valid).

        fetched: the files were written from chunks verified against the image index that
        manifest's record names (fastboot.imagefs.lazy_snapshots), so they are checked against
        manifest's file list and sizes but neither hashed nor fsynced here, and no digest goes
        into a cache: the first verify of the snapshot hashes them (after a crash too)."""
        if fetched:
            _lock_down(partial, fsync=False)
            _check_listing(partial, manifest)
        else:
            _lock_down(partial)
            manifest = Manifest(**{**manifest.__dict__, "files": describe_files(partial, cache)})
        fd = os.open(partial / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(manifest.to_json(), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        final = self.path(manifest.id)
        if final.exists():
            # Replace: move the old one aside first so the new one lands by a single rename.
            trash = self.root / f"{PARTIAL_PREFIX}old-{manifest.id}-{time.monotonic_ns()}"
            os.rename(final, trash)
            os.rename(partial, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(partial, final)
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return manifest

    def remove_stale_partials(self) -> None:
        """Remove .partial-* directories whose writer is gone (killed mid-dump)."""
        for path in self.root.glob(PARTIAL_PREFIX + "*"):
            parts = path.name.split("-")
            pid = int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None
            if pid is not None and pid != os.getpid() and Path(f"/proc/{pid}").exists():
                continue  # another live fastboot is writing it
            shutil.rmtree(path, ignore_errors=True)

    def read_manifest(self, snapshot_id: str) -> Manifest:
        path = self.path(snapshot_id) / MANIFEST
        try:
            data = json.loads(path.read_text())
            manifest = Manifest.from_json(data)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise SnapshotInvalid(f"snapshot {snapshot_id}: unreadable manifest ({exc})") from exc
        if manifest.id != snapshot_id:
            raise SnapshotInvalid(f"snapshot {snapshot_id}: manifest names {manifest.id}")
        return manifest

    def verify(self, snapshot_id: str, cache: DigestCache | None = None) -> Manifest:
        """The manifest, after checking every file's size and digest. Raises SnapshotInvalid.

        With a cache, files unchanged since they were last hashed are not hashed again (see
        fastboot.snapshot.digests for what that trusts); without one, everything is re-hashed."""
        manifest = self.read_manifest(snapshot_id)
        root = self.path(snapshot_id)
        on_disk = {
            str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
        }
        extra = on_disk - set(manifest.files)
        if extra:
            raise SnapshotInvalid(f"snapshot {snapshot_id}: unexpected files {sorted(extra)[:3]}")
        for rel, want in manifest.files.items():
            path = root / rel
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise SnapshotInvalid(f"snapshot {snapshot_id}: {rel} missing ({exc})") from exc
            if size != want["size"]:
                raise SnapshotInvalid(
                    f"snapshot {snapshot_id}: {rel} is {size} bytes, manifest says {want['size']}"
                )
        for rel, want in manifest.files.items():
            digest = cache.digest(root / rel) if cache else file_digest(root / rel)
            if digest != want["blake3"]:
                raise SnapshotInvalid(f"snapshot {snapshot_id}: {rel} does not match its digest")
        return manifest

    def list(self) -> list[Manifest | SnapshotInvalid]:
        """Every published snapshot (an unreadable one as its error), oldest first."""
        if not self.root.is_dir():
            return []
        found: list[Manifest | SnapshotInvalid] = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(PARTIAL_PREFIX) or not path.is_dir():
                continue
            try:
                found.append(self.read_manifest(path.name))
            except (SnapshotInvalid, FileNotFoundError) as exc:
                found.append(SnapshotInvalid(f"{path.name}: {exc}"))
        return sorted(found, key=lambda m: m.created if isinstance(m, Manifest) else 0.0)

    def resolve(self, prefix: str) -> SnapshotId:
        """The one snapshot id starting with prefix."""
        matches = [p.name for p in self.root.glob(prefix + "*") if not p.name.startswith(".")]
        if len(matches) != 1:
            what = "no snapshot" if not matches else f"{len(matches)} snapshots"
            raise SnapshotInvalid(f"{what} match {prefix!r} in {self.root}")
        return SnapshotId(matches[0])

    def remove(self, snapshot_id: str) -> None:
        path = self.path(snapshot_id)
        trash = self.root / f"{PARTIAL_PREFIX}rm-{snapshot_id}-{time.monotonic_ns()}"
        os.rename(path, trash)  # disappears at once, even if the delete is slow
        shutil.rmtree(trash)
