"""The image store: dedup across images, atomic publishing, permissions, gc, names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastboot.errors import ImageNotFoundError, UsageError
from fastboot.imagefs import build as build_module
from fastboot.imagefs.build import build
from fastboot.imagefs.store import ImageStore, check_name


def tree(root: Path, extra: bytes = b"") -> Path:
    root.mkdir(parents=True)
    (root / "shared.bin").write_bytes(bytes(range(256)) * 40_000)
    (root / "small.txt").write_text("same in both\n")
    if extra:
        (root / "extra.bin").write_bytes(extra)
    return root


def pack_bytes(store: ImageStore) -> int:
    return sum(p.stat().st_size for p in (store.root / "packs").glob("*.pack"))


def test_identical_bytes_are_stored_once_across_images(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    build(store, tree(tmp_path / "one"), "one", progress=False)
    first = pack_bytes(store)
    extra = os.urandom(300_000)
    second = build(store, tree(tmp_path / "two", extra), "two", progress=False)
    assert pack_bytes(store) == first + len(extra)
    assert second.stored_bytes == first + len(extra)
    assert [r.name for r in store.list_refs()] == ["one", "two"]


def test_every_file_is_0600_and_every_directory_0700(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    build(store, tree(tmp_path / "src"), "x", progress=False)
    paths = [*list(store.root.rglob("*")), store.root]
    assert all(p.stat().st_mode & 0o777 == (0o700 if p.is_dir() else 0o600) for p in paths)
    assert not list((store.root / "tmp").iterdir())


def test_a_failed_build_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ImageStore(tmp_path / "store")
    calls = 0
    real = build_module.digest_of

    def failing(data: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("disk on fire")
        return real(data)

    monkeypatch.setattr(build_module, "digest_of", failing)
    with pytest.raises(OSError, match="disk on fire"):
        build(store, tree(tmp_path / "src"), "x", progress=False)
    assert not store.list_refs()
    assert not list((store.root / "packs").iterdir())
    assert not list((store.root / "index").iterdir())
    assert not list((store.root / "tmp").iterdir())


def test_gc_removes_what_no_ref_uses_and_trims_the_cache(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    build(store, tree(tmp_path / "one"), "one", progress=False)
    build(store, tree(tmp_path / "two", os.urandom(200_000)), "two", progress=False)
    store.remove_ref("two")
    report = store.gc()
    assert report["packs"] == 1 and report["indexes"] == 1
    assert store.read_ref("one")
    for i in range(10):
        store.cache_put(f"{i:02d}" + "0" * 62, b"x" * 1000)
        os.utime(store.cache_path(f"{i:02d}" + "0" * 62), (i, i))
    report = store.gc(cache_high=5000, cache_low=3000)
    assert report["cache_chunks"] == 7
    assert sorted(p.name[:2] for p in (store.root / "cache").glob("*/*")) == ["07", "08", "09"]


def test_names_and_missing_images_give_clear_errors(tmp_path: Path) -> None:
    assert check_name("torch-2.13_cpu.env") == "torch-2.13_cpu.env"
    for bad in ("", "../x", "a/b", "-x", "x" * 200, "x.json"):
        with pytest.raises(UsageError):
            check_name(bad)
    store = ImageStore(tmp_path / "store").ensure()
    with pytest.raises(ImageNotFoundError, match="fastboot image pull nope"):
        store.read_ref("nope")
    with pytest.raises(UsageError, match="not a directory"):
        build(store, tmp_path / "missing", "x", progress=False)
