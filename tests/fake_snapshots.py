"""Published snapshots with a few files, for tests of what handles snapshots without CRIU."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastboot.snapshot.fingerprint import current as current_fingerprint
from fastboot.snapshot.store import Manifest, SnapshotId, Store

FAKE_ID = "0123456789abcdef01234567"


def fake_snapshot(
    snapshots: Path, snapshot_id: str = FAKE_ID, pages: bytes | None = None
) -> Manifest:
    """A published snapshot: 5 MiB of random page image (or pages), a core image, a shm file."""
    store = Store(snapshots)
    manifest = Manifest(
        id=SnapshotId(snapshot_id),
        key={"engine": "vllm", "model": {"name": "fake"}},
        fingerprint=current_fingerprint("vllm test"),
        oracle={},
        created=time.time(),
        cold_boot_s=1.0,
        dump_s=1.0,
        engine_argv=[],
        stdio_pipe="pipe:[1]",
    )
    with store.partial(manifest.id) as partial:
        (partial / "images").mkdir()
        (partial / "images" / "pages-1.img").write_bytes(pages or os.urandom(5 << 20))
        (partial / "images" / "core-1.img").write_bytes(b"core")
        (partial / "shm").mkdir()
        (partial / "shm" / "psm_x").write_bytes(b"\0" * 4096)
        return store.publish(partial, manifest)
