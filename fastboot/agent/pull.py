"""Fetching a snapshot from another host's agent: the cross-host path.

The source agent serves every file of a snapshot (`GET /v1/snapshots/ID/files/NAME`). The
manifest comes first; each file named in it is streamed into a private .partial directory and
hashed on the way in, its size and BLAKE3 checked against the manifest, and only a complete,
verified snapshot is published (atomic rename). Names come from another host: anything that is
not a plain relative path inside the snapshot is refused.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

import blake3

from fastboot.snapshot.digests import DigestCache
from fastboot.snapshot.store import MANIFEST, Manifest, SnapshotId, SnapshotInvalid, Store

logger = logging.getLogger(__name__)

CHUNK = 4 << 20


def _get(url: str, token: str | None, timeout: float = 60.0) -> urllib.response.addinfourl:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(request, timeout=timeout)  # type: ignore[no-any-return]


def _safe(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or name != str(path):
        raise SnapshotInvalid(f"refusing file name {name!r} from the source's manifest")
    return path


def pull(
    store: Store, source: str, snapshot_id: str, token: str | None, digests: DigestCache
) -> Manifest:
    """Fetch snapshot_id from the agent at source into store; returns its manifest."""
    base = f"{source.rstrip('/')}/v1/snapshots/{snapshot_id}/files"
    start = time.monotonic()
    try:
        with _get(f"{base}/{MANIFEST}", token) as response:
            manifest = Manifest.from_json(json.loads(response.read()))
    except (urllib.error.URLError, OSError, ValueError, TypeError, KeyError) as exc:
        raise SnapshotInvalid(
            f"could not read snapshot {snapshot_id} from {source}: {exc}"
        ) from exc
    if manifest.id != snapshot_id:
        raise SnapshotInvalid(f"{source} answered snapshot {manifest.id} for {snapshot_id}")
    if store.path(manifest.id).exists():
        return store.verify(manifest.id, digests)
    with store.partial(SnapshotId(manifest.id)) as partial:
        for name, want in manifest.files.items():
            _fetch(
                f"{base}/{name}", token, partial / _safe(name), int(want["size"]), want["blake3"]
            )
        published = store.publish(partial, manifest, digests)
    logger.info(
        "pulled snapshot %s from %s: %.2f GB in %.1f s",
        manifest.id[:12],
        source,
        published.total_bytes / 1e9,
        time.monotonic() - start,
    )
    return published


def _fetch(url: str, token: str | None, dest: Path, size: int, digest: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    hasher = blake3.blake3()
    got = 0
    try:
        with _get(url, token) as response, dest.open("wb") as out:
            while chunk := response.read(CHUNK):
                hasher.update(chunk)
                out.write(chunk)
                got += len(chunk)
    except (urllib.error.URLError, OSError) as exc:
        raise SnapshotInvalid(f"could not fetch {url}: {exc}") from exc
    if got != size or hasher.hexdigest() != digest:
        raise SnapshotInvalid(f"{url}: {got} bytes that do not match the manifest; not used")
