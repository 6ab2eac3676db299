"""ImageFS with real FUSE mounts, a real nginx as the remote, and real readers (cat, python, fio).

Every mount, daemon and nginx a test starts is stopped in a fixture's finally, and a failing test
shows the daemons' logs (captured teardown output).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fastboot.errors import ImageCorruptError, ImageNotFoundError, MountError
from fastboot.imagefs import metrics as fbmetrics
from fastboot.imagefs.build import build
from fastboot.imagefs.mount import MountOptions, mount, probe, reap, umount
from fastboot.imagefs.store import ImageStore, MountRecord, pid_alive
from fastboot.imagefs.sync import pull
from fastboot.imagefs.testing import Nginx, free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="FUSE mounts with allow_other need root"),
    pytest.mark.timeout(180),
]

MiB = 1024 * 1024
CHUNK = 1 * MiB


def fastboot_image(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastboot", "image", "--store", str(store), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def make_tree(root: Path) -> Path:
    """Small and multi-chunk files, a big directory, symlinks, a hardlink, an xattr, modes."""
    root.mkdir(parents=True)
    rng = __import__("random").Random(5)
    (root / "hello.txt").write_text("hello, image\n")
    (root / "empty").touch()
    (root / "big.bin").write_bytes(rng.randbytes(5 * MiB + 123))
    (root / "mid.bin").write_bytes(rng.randbytes(3 * MiB))
    many = root / "pkg" / "many"
    many.mkdir(parents=True)
    for i in range(400):
        (many / f"mod_{i:03d}.py").write_text(f"VALUE = {i}\n" + "# pad\n" * (i % 7))
    (root / "pkg" / "__init__.py").write_text("from .many import *\n")
    (root / "pkg" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(root / "pkg" / "run.sh", 0o755)
    os.symlink("hello.txt", root / "link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.link(root / "hello.txt", root / "pkg" / "hard.txt")
    os.setxattr(root / "mid.bin", "user.fastboot", b"xattr value")
    return root


def metrics_of(record: MountRecord) -> dict[str, float]:
    return fbmetrics.read_textfile(Path(record.metrics_file))


def tier(values: dict[str, float], name: str, which: str) -> float:
    return values.get(f'fastboot_imagefs_{name}_total{{tier="{which}"}}', 0.0)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "src")


@pytest.fixture
def mounts() -> Iterator[Callable[..., MountRecord]]:
    """mount(...) that is always undone; prints every daemon's log at teardown."""
    done: list[tuple[MountRecord, ImageStore]] = []

    def do_mount(
        name: str, point: Path, store: ImageStore, options: MountOptions | None = None
    ) -> MountRecord:
        point.mkdir(parents=True, exist_ok=True)
        record = mount(name, point, store, options)
        done.append((record, store))
        return record

    yield do_mount
    for record, store in reversed(done):
        print(f"--- daemon log {record.log} ---")
        with __import__("contextlib").suppress(OSError):
            print(Path(record.log).read_text()[-4000:])
        if probe(record.mountpoint) in ("mounted", "dead"):
            try:
                umount(Path(record.mountpoint), store, lazy=True)
            except MountError as exc:
                print(f"teardown: {exc}")
        if pid_alive(record.pid):
            os.kill(record.pid, signal.SIGKILL)
        reap()
        assert probe(record.mountpoint) not in ("mounted", "dead")


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Nginx]:
    served = tmp_path / "remote"
    served.mkdir()
    os.chmod(tmp_path, 0o755)
    server = Nginx(served, tmp_path / "nginx")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        print("--- nginx error log ---\n" + server.error_log[-2000:])


def read_all(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# -- local images ------------------------------------------------------------------------------


def test_mount_serves_the_tree_like_the_source(
    tree: Path, tmp_path: Path, mounts: Callable[..., MountRecord]
) -> None:
    store = ImageStore(tmp_path / "store")
    build(store, tree, "tree", chunk_size=CHUNK, progress=False)
    point = tmp_path / "mnt"
    port = free_port()
    record = mounts("tree", point, store, MountOptions(metrics_port=port))

    assert read_all(point) == read_all(tree)
    assert sorted(os.listdir(point / "pkg" / "many")) == sorted(os.listdir(tree / "pkg" / "many"))
    cat = subprocess.run(["cat", str(point / "link")], capture_output=True, check=True)
    assert cat.stdout == b"hello, image\n"
    assert os.readlink(point / "dangling") == "/nonexistent/target"
    assert os.stat(point / "hello.txt").st_ino == os.stat(point / "pkg" / "hard.txt").st_ino
    assert os.stat(point / "hello.txt").st_nlink == 2
    assert os.stat(point / "pkg" / "run.sh").st_mode & 0o777 == 0o755
    assert os.stat(point / "big.bin").st_size == 5 * MiB + 123
    assert os.getxattr(point / "mid.bin", "user.fastboot") == b"xattr value"
    ran = subprocess.run([str(point / "pkg" / "run.sh")], capture_output=True, check=True)
    assert ran.stdout == b"ran\n"
    imported = subprocess.run(
        [sys.executable, "-c", "import pkg.many.mod_123 as m; print(m.VALUE)"],
        cwd=point,
        capture_output=True,
        text=True,
        check=True,
    )
    assert imported.stdout.strip() == "123"
    with pytest.raises(OSError) as written:
        (point / "hello.txt").write_text("no")
    assert written.value.errno == errno.EROFS
    with pytest.raises(FileNotFoundError):
        os.stat(point / "pkg" / "missing.py")

    # A second probe of the missing name is answered by the kernel (negative entry cached).
    def live() -> dict[str, float]:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return fbmetrics.parse(response.read().decode())

    lookups = live()['fastboot_imagefs_ops_total{op="lookup"}']
    with pytest.raises(FileNotFoundError):
        os.stat(point / "pkg" / "missing.py")
    assert live()['fastboot_imagefs_ops_total{op="lookup"}'] == lookups
    assert tier(live(), "chunk_hits", "local") >= 1

    subprocess.run(
        [
            sys.executable,
            "-m",
            "fastboot",
            "image",
            "--store",
            str(store.root),
            "umount",
            str(point),
        ],
        check=True,
        timeout=60,
    )
    assert not os.path.ismount(point)
    assert not pid_alive(record.pid)


def test_dedup_across_images_and_gc_keeps_what_is_mounted(
    tree: Path, tmp_path: Path, mounts: Callable[..., MountRecord]
) -> None:
    store = ImageStore(tmp_path / "store")
    first = build(store, tree, "one", chunk_size=CHUNK, progress=False)
    packs_before = sorted(p.name for p in (store.root / "packs").glob("*.pack"))
    (tree / "extra.bin").write_bytes(os.urandom(2 * MiB))
    second = build(store, tree, "two", chunk_size=CHUNK, progress=False)
    new_packs = sorted(p.name for p in (store.root / "packs").glob("*.pack"))
    assert len(new_packs) == len(packs_before) + 1
    new_pack = next(p for p in new_packs if p not in packs_before)
    assert (store.root / "packs" / new_pack).stat().st_size == 2 * MiB  # only the new bytes
    assert second.total_bytes == first.total_bytes + 2 * MiB
    for path in store.root.rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o700 if path.is_dir() else 0o600), path

    mounts("one", tmp_path / "mnt", store)
    store.remove_ref("one")
    store.remove_ref("two")
    report = store.gc()
    assert report["packs"] == 1  # "two"'s own pack; "one" is mounted, so its packs stay
    assert read_all(tmp_path / "mnt") == {
        k: v for k, v in read_all(tree).items() if k != "extra.bin"
    }


def test_verify_finds_a_corrupt_pack_and_reads_never_return_wrong_bytes(
    tree: Path, tmp_path: Path, mounts: Callable[..., MountRecord]
) -> None:
    store = ImageStore(tmp_path / "store")
    ref = build(store, tree, "tree", chunk_size=CHUNK, progress=False)
    assert fastboot_image(store.root, "verify", "tree").returncode == 0
    index = store.load_index(ref.index)
    chunk = index.file_chunk(index.resolve("big.bin") or 0, 2)
    with open(store.pack_path(chunk.pack), "r+b") as f:
        f.seek(chunk.offset + 100)
        byte = f.read(1)
        f.seek(chunk.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = fastboot_image(store.root, "verify", "tree")
    assert result.returncode == 1
    assert "1 corrupt" in result.stdout
    record = mounts("tree", tmp_path / "mnt", store)
    with pytest.raises(OSError) as failed:
        (tmp_path / "mnt" / "big.bin").read_bytes()
    assert failed.value.errno == errno.EIO
    assert (tmp_path / "mnt" / "mid.bin").read_bytes() == (tree / "mid.bin").read_bytes()
    umount(tmp_path / "mnt", store)
    assert tier(metrics_of(record), "corrupt_chunks", "local") >= 1
    assert "corrupt" in Path(record.log).read_text()


def test_clear_errors_for_unknown_names_busy_mountpoints_and_bad_indexes(
    tree: Path, tmp_path: Path, mounts: Callable[..., MountRecord]
) -> None:
    store = ImageStore(tmp_path / "store")
    ref = build(store, tree, "tree", chunk_size=CHUNK, progress=False)
    point = tmp_path / "mnt"
    point.mkdir()
    result = fastboot_image(store.root, "mount", "nope", str(point))
    assert result.returncode == 1
    assert "no image 'nope'" in result.stderr and "fastboot image build" in result.stderr

    mounts("tree", point, store)
    result = fastboot_image(store.root, "mount", "tree", str(point))
    assert result.returncode == 1
    assert "is busy" in result.stderr and "fastboot image umount" in result.stderr

    full = tmp_path / "full"
    full.mkdir()
    (full / "x").touch()
    with pytest.raises(MountError, match="not empty"):
        mount("tree", full, store)

    index_path = store.index_path(ref.index)
    blob = index_path.read_bytes()
    index_path.write_bytes(blob[: len(blob) // 2])
    (tmp_path / "other").mkdir()
    with pytest.raises(ImageCorruptError, match="does not match its digest"):
        mount("tree", tmp_path / "other", store)
    result = fastboot_image(store.root, "mount", "tree", str(tmp_path / "other"))
    assert result.returncode == 1 and "build or pull it again" in result.stderr
    assert not os.path.ismount(tmp_path / "other")
    with pytest.raises(ImageNotFoundError):
        store.read_ref("nope")


def test_killed_daemon_leaves_enotconn_and_mount_again_recovers(
    tree: Path, tmp_path: Path, mounts: Callable[..., MountRecord]
) -> None:
    store = ImageStore(tmp_path / "store")
    build(store, tree, "tree", chunk_size=CHUNK, progress=False)
    point = tmp_path / "mnt"
    record = mounts("tree", point, store)
    os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(record.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(OSError) as dead:
        os.stat(point / "hello.txt")
    # Depending on the path the kernel takes, ENOTCONN or ECONNABORTED: no daemon behind it.
    assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert probe(str(point)) == "dead"
    result = fastboot_image(store.root, "mount", "tree", str(point))
    assert result.returncode == 0, result.stderr
    again = next(m for m in store.mounts() if m.mountpoint == str(point))
    mounts_record = again  # cleaned up below
    try:
        assert (point / "hello.txt").read_text() == "hello, image\n"
    finally:
        umount(point, store)
    assert not pid_alive(mounts_record.pid)


def test_fio_random_and_sequential_reads(
    tree: Path, tmp_path: Path, mounts: Callable[..., MountRecord]
) -> None:
    store = ImageStore(tmp_path / "store")
    build(store, tree, "tree", chunk_size=CHUNK, progress=False)
    point = tmp_path / "mnt"
    mounts("tree", point, store)
    for rw, bs in (("randread", "4k"), ("read", "1M")):
        out = subprocess.run(
            [
                "fio",
                "--name=t",
                f"--filename={point / 'big.bin'}",
                f"--rw={rw}",
                f"--bs={bs}",
                "--size=5M",
                "--ioengine=psync",
                "--readonly",
                "--output-format=json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
        assert job["error"] == 0
        assert job["read"]["io_bytes"] == 5 * MiB


# -- a remote behind nginx ---------------------------------------------------------------------


def published(tree: Path, tmp_path: Path, server: Nginx) -> ImageStore:
    """Build `tree` as image "tree" and push it to the directory nginx serves."""
    origin = ImageStore(tmp_path / "origin")
    build(origin, tree, "tree", chunk_size=CHUNK, progress=False)
    result = fastboot_image(origin.root, "push", "tree", "--to", str(server.root))
    assert result.returncode == 0, result.stderr
    return origin


def test_lazy_mount_fetches_only_what_is_read_and_verifies_it(
    tree: Path, tmp_path: Path, remote: Nginx, mounts: Callable[..., MountRecord]
) -> None:
    published(tree, tmp_path, remote)
    store = ImageStore(tmp_path / "host")
    result = fastboot_image(store.root, "pull", "tree", "--remote", remote.url)
    assert result.returncode == 0, result.stderr
    assert not list((store.root / "packs").iterdir())
    point = tmp_path / "mnt"
    record = mounts("tree", point, store, MountOptions(readahead_chunks=0))
    assert (point / "hello.txt").read_text() == "hello, image\n"
    with open(point / "big.bin", "rb") as f:
        f.seek(2 * MiB + 10)
        assert f.read(1000) == (tree / "big.bin").read_bytes()[2 * MiB + 10 : 2 * MiB + 1010]
    umount(point, store)
    values = metrics_of(record)
    fetched = tier(values, "chunk_bytes", "remote")
    assert 0 < fetched <= 2 * CHUNK  # hello.txt and one chunk of big.bin (kernel readahead
    assert tier(values, "corrupt_chunks", "remote") == 0  # may touch the next one)
    assert len(list((store.root / "cache").glob("*/*"))) == tier(values, "chunk_hits", "remote")

    # Everything, through a fresh mount (cold page cache): cached chunks and the rest.
    mounts("tree", point, store)
    assert read_all(point) == read_all(tree)


def test_corrupt_remote_chunk_is_eio_and_corrupt_cache_is_refetched(
    tree: Path, tmp_path: Path, remote: Nginx, mounts: Callable[..., MountRecord]
) -> None:
    origin = published(tree, tmp_path, remote)
    index = origin.load_index(origin.read_ref("tree").index)
    chunk = index.file_chunk(index.resolve("big.bin") or 0, 1)
    served = remote.root / "packs" / f"{chunk.pack}.pack"
    good = served.read_bytes()
    bad = bytearray(good)
    bad[chunk.offset + 7] ^= 0x01
    served.write_bytes(bytes(bad))

    store = ImageStore(tmp_path / "host")
    pull(store, "tree", remote.url)
    point = tmp_path / "mnt"
    record = mounts("tree", point, store, MountOptions(readahead_chunks=0))
    with open(point / "big.bin", "rb") as f:
        assert f.read(4096) == (tree / "big.bin").read_bytes()[:4096]  # chunk 0 is fine
        f.seek(MiB)
        with pytest.raises(OSError) as failed:
            f.read(4096)
        assert failed.value.errno == errno.EIO
    assert not store.cache_path(chunk.hex).exists()  # never cached
    umount(point, store)
    assert tier(metrics_of(record), "corrupt_chunks", "remote") >= 1
    assert "does not match its digest" in Path(record.log).read_text()

    # The remote is repaired; a cached chunk rots on the SSD: detected, refetched, right bytes.
    served.write_bytes(good)
    record = mounts("tree", point, store, MountOptions(readahead_chunks=0))
    assert (point / "big.bin").read_bytes() == (tree / "big.bin").read_bytes()
    umount(point, store)
    cached = store.cache_path(chunk.hex)
    rotten = bytearray(cached.read_bytes())
    rotten[0] ^= 0xFF
    cached.write_bytes(bytes(rotten))
    record = mounts("tree", point, store, MountOptions(readahead_chunks=0))
    assert (point / "big.bin").read_bytes() == (tree / "big.bin").read_bytes()
    umount(point, store)
    values = metrics_of(record)
    assert tier(values, "corrupt_chunks", "cache") == 1
    assert tier(values, "chunk_hits", "remote") == 1
    assert cached.read_bytes() == good[chunk.offset : chunk.offset + chunk.length]


def test_remote_down_serves_cached_data_fails_the_rest_and_recovers(
    tree: Path, tmp_path: Path, remote: Nginx, mounts: Callable[..., MountRecord]
) -> None:
    published(tree, tmp_path, remote)
    store = ImageStore(tmp_path / "host")
    pull(store, "tree", remote.url)
    point = tmp_path / "mnt"
    mounts("tree", point, store, MountOptions(readahead_chunks=0))
    assert (point / "mid.bin").read_bytes() == (tree / "mid.bin").read_bytes()
    umount(point, store)

    remote.stop()
    record = mounts("tree", point, store, MountOptions(readahead_chunks=0))
    assert (point / "mid.bin").read_bytes() == (tree / "mid.bin").read_bytes()  # SSD cache
    with pytest.raises(OSError) as failed:
        (point / "hello.txt").read_bytes()
    assert failed.value.errno == errno.EIO
    assert "is the remote up" in Path(record.log).read_text()

    remote.start()
    assert (point / "hello.txt").read_text() == "hello, image\n"
    umount(point, store)
    values = metrics_of(record)
    assert values["fastboot_imagefs_remote_errors_total"] >= 1
    assert tier(values, "chunk_hits", "cache") >= 1


def test_fully_pulled_image_works_offline(
    tree: Path, tmp_path: Path, remote: Nginx, mounts: Callable[..., MountRecord]
) -> None:
    published(tree, tmp_path, remote)
    store = ImageStore(tmp_path / "host")
    result = fastboot_image(store.root, "pull", "tree", "--remote", remote.url, "--all")
    assert result.returncode == 0, result.stderr
    remote.stop()
    record = mounts("tree", tmp_path / "mnt", store)
    assert read_all(tmp_path / "mnt") == read_all(tree)
    umount(tmp_path / "mnt", store)
    values = metrics_of(record)
    assert tier(values, "chunk_hits", "remote") == 0
    assert values["fastboot_imagefs_remote_errors_total"] == 0
    verified = fastboot_image(store.root, "verify", "tree")
    assert verified.returncode == 0 and "0 corrupt, 0 only on the remote" in verified.stdout


def test_profile_recorded_then_replayed_at_next_mount(
    tree: Path, tmp_path: Path, remote: Nginx, mounts: Callable[..., MountRecord]
) -> None:
    published(tree, tmp_path, remote)
    store = ImageStore(tmp_path / "host")
    pull(store, "tree", remote.url)
    point = tmp_path / "mnt"
    wanted = ["hello.txt", "pkg/many/mod_007.py", "pkg/many/mod_300.py", "mid.bin"]
    mounts("tree", point, store, MountOptions(readahead_chunks=0))
    for name in wanted:
        assert (point / name).read_bytes() == (tree / name).read_bytes()
    umount(point, store)
    ref = store.read_ref("tree")
    assert store.profile_path(ref.index).stat().st_size > 8
    shutil.rmtree(store.root / "cache")
    (store.root / "cache").mkdir(mode=0o700)

    record = mounts("tree", point, store, MountOptions(readahead_chunks=0))
    expected = 3 * CHUNK + sum((tree / n).stat().st_size for n in wanted[:3])
    deadline = time.monotonic() + 20
    while metrics_of(record).get("fastboot_imagefs_prefetch_bytes_total", 0) < expected:
        assert time.monotonic() < deadline, metrics_of(record)
        time.sleep(0.1)
    for name in wanted:
        assert (point / name).read_bytes() == (tree / name).read_bytes()
    umount(point, store)
    values = metrics_of(record)
    assert values["fastboot_imagefs_prefetch_bytes_total"] == expected
    # The prefetch put its chunks into the kernel's page cache of the mount: the reads were
    # answered there without asking the daemon, and the remote saw only the prefetch's ranged
    # GETs, fewer than the chunks (neighbours coalesce into one GET).
    assert values.get('fastboot_imagefs_ops_total{op="read"}', 0) == 0, values
    assert values["fastboot_imagefs_prefetch_used_bytes_total"] == 0
    gets = values["fastboot_imagefs_remote_fetch_seconds_count"]
    assert 1 <= gets < 6
    # ... and wrote them to the SSD cache afterwards, for the next mount on this host.
    assert len(list((store.root / "cache").glob("*/*"))) == 6
