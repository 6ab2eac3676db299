"""The snapshot store: atomic publish, private modes, verification, stale partials."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from fastboot.snapshot import fingerprint
from fastboot.snapshot.digests import DigestCache
from fastboot.snapshot.store import Manifest, SnapshotId, SnapshotInvalid, Store

HOST = fingerprint.current("vllm test")


def manifest(snapshot_id: str = "abc123") -> Manifest:
    return Manifest(
        id=SnapshotId(snapshot_id),
        key={"engine": "vllm", "engine_version": "0", "model": {}},
        fingerprint=HOST,
        oracle={"token_ids": [1, 2]},
        created=1.0,
        cold_boot_s=30.0,
        dump_s=2.0,
        engine_argv=["--port", "1"],
        stdio_pipe="pipe:[7]",
    )


def publish(
    store: Store,
    snapshot_id: str = "abc123",
    payload: bytes = b"pages",
    cache: DigestCache | None = None,
) -> Manifest:
    with store.partial(SnapshotId(snapshot_id)) as partial:
        (partial / "images").mkdir()
        (partial / "images" / "pages-1.img").write_bytes(payload)
        (partial / "images" / "empty.img").write_bytes(b"")
        return store.publish(partial, manifest(snapshot_id), cache)


def test_publish_then_verify_and_modes(tmp_path: Path) -> None:
    store = Store(tmp_path / "snaps")
    published = publish(store)
    assert set(published.files) == {"images/pages-1.img", "images/empty.img"}
    assert published.total_bytes == 5
    assert store.verify("abc123").oracle == {"token_ids": [1, 2]}
    for path in [store.root, *store.root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path
    assert [p.name for p in store.root.iterdir()] == ["abc123"]  # no partial left


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "images/pages-1.img").write_bytes(b"pagez"), "does not match its digest"),
        (lambda p: (p / "images/pages-1.img").write_bytes(b"pag"), "is 3 bytes, manifest says 5"),
        (lambda p: (p / "images/pages-1.img").unlink(), "missing"),
        (lambda p: (p / "images/extra.img").write_bytes(b"x"), "unexpected files"),
        (lambda p: (p / "manifest.json").write_text("{"), "unreadable manifest"),
    ],
)
@pytest.mark.parametrize("cached", [False, True], ids=["hashed", "digest-cache"])
def test_damage_is_detected(tmp_path: Path, damage: object, message: str, cached: bool) -> None:
    """Also when the digests were remembered at publish: a write changes the file's identity."""
    store = Store(tmp_path / "snaps")
    cache = DigestCache(tmp_path / "digests.json") if cached else None
    publish(store, cache=cache)
    if cache:
        store.verify("abc123", cache)
        assert cache.hits == 2 and cache.misses == 2  # hashed once at publish, then remembered
    damage(store.path("abc123"))  # type: ignore[operator]
    with pytest.raises(SnapshotInvalid, match=message):
        store.verify("abc123", cache)


def test_manifest_must_name_its_own_directory(tmp_path: Path) -> None:
    store = Store(tmp_path)
    publish(store)
    os.rename(store.path("abc123"), store.path("def456"))
    with pytest.raises(SnapshotInvalid, match="manifest names abc123"):
        store.verify("def456")


def test_republish_replaces_atomically(tmp_path: Path) -> None:
    store = Store(tmp_path)
    publish(store, payload=b"old")
    publish(store, payload=b"newer")
    assert store.verify("abc123").total_bytes == 5
    assert [p.name for p in tmp_path.iterdir()] == ["abc123"]


def test_partial_of_a_dead_writer_is_removed_and_never_listed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    dead = tmp_path / ".partial-abc123-999999999-1"  # no such pid
    dead.mkdir()
    (dead / "junk").write_bytes(b"x")
    assert store.list() == []
    publish(store)
    assert not dead.exists()


def test_list_resolve_remove(tmp_path: Path) -> None:
    store = Store(tmp_path)
    publish(store, "aaa111")
    publish(store, "bbb222")
    (tmp_path / "ccc333").mkdir(mode=0o700)  # no manifest
    listed = store.list()
    assert [m.id for m in listed if isinstance(m, Manifest)] == ["aaa111", "bbb222"]
    assert any(isinstance(m, SnapshotInvalid) for m in listed)
    assert store.resolve("bb") == "bbb222"
    with pytest.raises(SnapshotInvalid, match="no snapshot match"):
        store.resolve("zz")
    store.remove("aaa111")
    assert not (tmp_path / "aaa111").exists()


def test_manifest_round_trip(tmp_path: Path) -> None:
    data = json.loads(json.dumps(manifest().to_json()))
    assert Manifest.from_json(data) == manifest()
    with pytest.raises(SnapshotInvalid, match="format"):
        Manifest.from_json({**data, "format": 99})


def test_fingerprint_compatibility() -> None:
    assert fingerprint.incompatibility(HOST, HOST) is None
    fewer_flags = fingerprint.Fingerprint(**{**HOST.__dict__, "cpu_flags": HOST.cpu_flags[:3]})
    # A snapshot from a host with fewer CPU features restores here; the reverse does not.
    assert fingerprint.incompatibility(fewer_flags, HOST) is None
    if len(HOST.cpu_flags) > 3:
        assert "lacks features" in str(fingerprint.incompatibility(HOST, fewer_flags))
    newer_kernel = fingerprint.Fingerprint(**{**HOST.__dict__, "kernel": "99.0.0"})
    assert "kernel differs" in str(fingerprint.incompatibility(newer_kernel, HOST))
    assert fingerprint.Fingerprint.from_json(HOST.to_json()) == HOST


def test_copy_sparse_keeps_content_and_makes_holes(tmp_path: Path) -> None:
    from fastboot.host.shm import copy_sparse

    src = tmp_path / "psm_queue"
    with src.open("wb") as f:
        f.write(b"head")
        f.seek(64 << 20)  # a hole
        f.write(bytes(8 << 20))  # written zeros: become a hole in the copy
        f.write(b"tail")
        f.truncate(100 << 20)
    dst = tmp_path / "copy"
    copy_sparse(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == 100 << 20
    assert dst.stat().st_blocks * 512 < 4 << 20  # only the blocks with data were written
