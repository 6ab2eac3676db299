"""Snapshots pushed to a remote and mounted lazily on a host that lacks them: real FUSE, nginx.

What the chain of trust (record -> index digest -> chunk digests) must refuse, without CRIU or an
engine: an index that is not the one the record names, a record whose files are not the
image's, a chunk corrupted on the remote, and a remote that dies after the mount. The restores
themselves (real vLLM, CRIU) are in test_agent.py and test_imagefs_serve.py.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastboot.errors import ImageCorruptError, ImageFSError
from fastboot.imagefs.lazy_snapshots import fetch, open_lazy, push, record_path
from fastboot.imagefs.mount import probe
from fastboot.imagefs.store import ImageStore
from fastboot.imagefs.testing import Nginx
from fastboot.snapshot.store import Manifest, SnapshotInvalid, Store
from tests.fake_snapshots import fake_snapshot

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="FUSE mounts need root"),
]


@dataclass
class Remote:
    root: Path
    source: Store
    manifest: Manifest
    served: Path
    server: Nginx

    def host(self, name: str) -> ImageStore:
        """A fresh host's image store (nothing of the snapshot in it)."""
        return ImageStore(self.root / name / "images")

    def served_copy(self, name: str) -> str:
        """A second remote store under the same server (a copy to tamper with); its URL."""
        copy = self.served / name
        for sub in ("refs", "index", "packs", "profiles", "snapshots"):
            if (self.served / sub).is_dir():
                (copy / sub).mkdir(parents=True, mode=0o755)
                for f in (self.served / sub).iterdir():
                    (copy / sub / f.name).write_bytes(f.read_bytes())
                    os.chmod(copy / sub / f.name, 0o644)
        return f"{self.server.url}/{name}"


@pytest.fixture
def remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Remote]:
    monkeypatch.setenv("FASTBOOT_HOME", str(tmp_path / "home"))  # stable mountpoints
    os.chmod(tmp_path, 0o755)  # nginx workers read the served directory
    manifest = fake_snapshot(tmp_path / "a")
    served = tmp_path / "served"
    pushed = push(Store(tmp_path / "a"), manifest.id, ImageStore(tmp_path / "origin"), served)
    assert pushed.index and pushed.image_bytes == manifest.total_bytes + len(
        (tmp_path / "a" / manifest.id / "manifest.json").read_bytes()
    )
    server = Nginx(served, tmp_path / "nginx")
    server.start()
    try:
        yield Remote(tmp_path, Store(tmp_path / "a"), manifest, served, server)
    finally:
        server.stop()


def test_a_pushed_snapshot_mounts_lazily_and_reads_back_exactly(remote: Remote) -> None:
    record = remote.served / record_path(remote.manifest.id)
    assert stat.S_IMODE(record.stat().st_mode) == 0o644  # the web server serves it
    assert json.loads(record.read_text())["manifest"] == remote.manifest.to_json()
    store = remote.host("b")
    lazy = open_lazy(remote.manifest.id, remote.server.url, store)
    assert lazy is not None and lazy.manifest == remote.manifest
    try:
        # Nothing of the page image was fetched to mount and check it: only the record, the
        # index and manifest.json (a small file, one chunk).
        assert not list((store.root / "cache").glob("*/*"))
        source = remote.source.path(remote.manifest.id)
        for rel in remote.manifest.files:
            assert (lazy.path / rel).read_bytes() == (source / rel).read_bytes(), rel
        assert list((store.root / "cache").glob("*/*"))  # what was read is local now
    finally:
        lazy.release()
    assert probe(str(lazy.path)) in ("missing", "free")
    assert not store.mounts(include_dead=True)
    assert open_lazy("fedcba9876543210fedcba98", remote.server.url, store) is None


def test_a_second_snapshot_of_the_same_pages_adds_little_to_the_store(remote: Remote) -> None:
    pages = (remote.source.path(remote.manifest.id) / "images" / "pages-1.img").read_bytes()
    other = fake_snapshot(remote.root / "a", "89abcdef0123456789abcdef", pages)
    pushed = push(remote.source, other.id, ImageStore(remote.root / "origin"), remote.served)
    # Only its manifest and the small files differ: the 5 MiB page image is shared.
    assert pushed.image_bytes > 5 << 20 and pushed.new_stored_bytes < 64 << 10, pushed


def test_a_second_snapshot_with_its_pages_moved_adds_little_to_the_store(remote: Remote) -> None:
    # As two snapshots of one engine: the same pages after heaps of other sizes (seeded, so
    # where the content-defined cuts fall is the same every run).
    shared = random.Random(1).randbytes(5 << 20)
    added = []
    for n, before in enumerate((7, 300)):
        pages = random.Random(n + 2).randbytes(before * 4096) + shared
        other = fake_snapshot(remote.root / "a", f"{n + 1:x}" * 24, pages)
        pushed = push(remote.source, other.id, ImageStore(remote.root / "origin"), remote.served)
        added.append(pushed.new_stored_bytes)
    # fixed-size chunks at fixed offsets would store the whole 5 MiB again
    assert added[0] > 5 << 20 and added[1] < 2 << 20, added


def test_an_index_that_is_not_the_one_the_record_names_is_refused(remote: Remote) -> None:
    url = remote.served_copy("tampered")
    index = remote.served / "tampered" / "index"
    (blob,) = index.iterdir()
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")  # still parses; another digest
    store = remote.host("c")
    with pytest.raises(ImageCorruptError, match="does not match the digest its record names"):
        open_lazy(remote.manifest.id, url, store)
    assert not store.mounts(include_dead=True)
    assert not list(store.root.joinpath("refs").glob("*")), "no ref for a refused image"


def test_a_record_whose_files_are_not_the_images_is_refused(remote: Remote) -> None:
    url = remote.served_copy("wrong-record")
    record = remote.served / "wrong-record" / record_path(remote.manifest.id)
    data = json.loads(record.read_text())
    data["manifest"]["files"]["images/core-1.img"]["size"] += 1
    record.write_text(json.dumps(data))
    store = remote.host("d")
    with pytest.raises(SnapshotInvalid, match="sizes differ from the manifest"):
        open_lazy(remote.manifest.id, url, store)
    assert not store.mounts(include_dead=True)


def test_a_chunk_corrupted_on_the_remote_is_never_served(remote: Remote) -> None:
    url = remote.served_copy("corrupt")
    store = remote.host("e")
    lazy = open_lazy(remote.manifest.id, url, store)
    assert lazy is not None
    try:
        entry = lazy.index.resolve("images/pages-1.img")
        assert entry is not None
        chunk = lazy.index.file_chunk(entry, 0)
        pack = remote.served / "corrupt" / "packs" / f"{chunk.pack}.pack"
        data = bytearray(pack.read_bytes())
        data[chunk.offset + 100] ^= 0xFF
        pack.write_bytes(bytes(data))
        with (
            pytest.raises(OSError) as caught,
            (lazy.path / "images" / "pages-1.img").open("rb") as f,
        ):
            f.read()
        assert caught.value.errno == errno.EIO
        assert not store.read_cached(chunk.hex)  # the bad copy was not kept
    finally:
        lazy.release()
    assert not store.mounts(include_dead=True)


def test_the_remote_dying_after_the_mount_is_a_clear_error_not_a_hang(remote: Remote) -> None:
    store = remote.host("f")
    lazy = open_lazy(remote.manifest.id, remote.server.url, store)
    assert lazy is not None
    try:
        remote.server.stop()
        start = time.monotonic()
        with pytest.raises(OSError) as caught:
            (lazy.path / "images" / "pages-1.img").read_bytes()
        assert caught.value.errno == errno.EIO
        assert time.monotonic() - start < 30
        daemon_log = Path(store.mounts()[0].log).read_text()
        assert "Connection refused" in daemon_log or "remote" in daemon_log, daemon_log[-2000:]
    finally:
        lazy.release()
    assert not store.mounts(include_dead=True)


def test_a_fetched_snapshot_is_published_whole_and_sparse(remote: Remote) -> None:
    zeros_then_data = bytes(8 << 20) + os.urandom(1 << 20)  # two zero chunks, then data
    sparse = fake_snapshot(remote.root / "a", "aaaabbbbccccddddeeeeffff", zeros_then_data)
    push(remote.source, sparse.id, ImageStore(remote.root / "origin"), remote.served)
    here = Store(remote.root / "g" / "snapshots")
    got = fetch(sparse.id, remote.server.url, remote.host("g"), here)
    assert got is not None and not got.mounted and got.path == here.path(sparse.id)
    assert got.fetched_bytes < 2 << 20  # the zero chunks were not fetched
    pages = got.path / "images" / "pages-1.img"
    assert pages.read_bytes() == zeros_then_data
    assert pages.stat().st_blocks * 512 < 4 << 20  # and are holes
    assert stat.S_IMODE(pages.stat().st_mode) == 0o600
    assert stat.S_IMODE(got.path.stat().st_mode) == 0o700
    assert here.verify(sparse.id).files == sparse.files  # every digest, hashed from scratch
    assert fetch("fedcba9876543210fedcba98", remote.server.url, remote.host("g"), here) is None


def test_a_fetch_that_meets_a_corrupt_chunk_or_a_missing_pack_publishes_nothing(
    remote: Remote,
) -> None:
    url = remote.served_copy("bad-pack")
    (pack,) = (remote.served / "bad-pack" / "packs").glob("*.pack")
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    here = Store(remote.root / "h" / "snapshots")
    with pytest.raises(ImageCorruptError, match=r"does not match its digest|does not decompress"):
        fetch(remote.manifest.id, url, remote.host("h"), here)
    assert not here.root.exists() or not list(here.root.iterdir())
    pack.unlink()  # the remote lost the pack after serving the index: an HTTP 404
    with pytest.raises(ImageFSError):
        fetch(remote.manifest.id, url, remote.host("h"), here)
    assert not here.root.exists() or not list(here.root.iterdir())
