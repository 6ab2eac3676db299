"""FUSE passthrough with real mounts: a big file read whole is written to local disk and later
opens are read by the kernel from that file, never by the daemon; a cached open keeps its inode
cached; a corrupted kept file is detected and never served; `passthrough=False` keeps the old
behaviour. With nginx as the remote: a streamed file is kept whole (read back from the page
cache, each chunk fetched once) instead of chunk by chunk, and then served with the remote down;
a stream that stops early has its chunks cached; concurrent readers get exact bytes while the
daemon's replies are sent without the GIL. Needs the patched pyfuse3
(fastboot/imagefs/provision-fuse.sh, run by scripts/setup).
"""

from __future__ import annotations

import mmap
import os
import random
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fastboot.imagefs import passthrough
from fastboot.imagefs.build import build
from fastboot.imagefs.mount import MountOptions, umount
from fastboot.imagefs.store import KEEP_MIN_BYTES, ImageStore, MountRecord
from fastboot.imagefs.sync import pull
from fastboot.imagefs.testing import Nginx
from tests.integration.test_imagefs import metrics_of, mounts, remote

__all__ = ["mounts", "remote"]  # the fixtures, shared with test_imagefs

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="FUSE passthrough needs CAP_SYS_ADMIN"),
    pytest.mark.skipif(
        not passthrough.supported(),
        reason="pyfuse3 without fastboot's passthrough patch (fastboot/imagefs/provision-fuse.sh)",
    ),
    pytest.mark.timeout(180),
]

MiB = 1024 * 1024
SIZE = KEEP_MIN_BYTES + 3 * MiB + 17


@pytest.fixture(scope="module")
def content() -> bytes:
    return random.Random(11).randbytes(SIZE)


@pytest.fixture
def image(tmp_path: Path, content: bytes) -> ImageStore:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(content)
    (src / "small.txt").write_text("small files are never kept whole\n")
    store = ImageStore(tmp_path / "store")
    build(store, src, "pt", progress=False)
    return store


def metric(record: MountRecord, name: str) -> float:
    return metrics_of(record).get(f"fastboot_imagefs_{name}", 0.0)


def wait_metric(record: MountRecord, name: str, at_least: float, deadline_s: float = 60) -> float:
    """Poll the daemon's metrics textfile (written every second) until name >= at_least."""
    deadline = time.monotonic() + deadline_s
    while (value := metric(record, name)) < at_least:
        if time.monotonic() > deadline:
            log = Path(record.log).read_text()[-3000:]
            raise AssertionError(f"{name} = {value} < {at_least} after {deadline_s} s\n{log}")
        time.sleep(0.1)
    return value


def settle(record: MountRecord) -> dict[str, float]:
    """The metrics once the daemon has written them after everything done so far."""
    time.sleep(1.2)
    return metrics_of(record)


def read_whole(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as fh:
        return fh.read()


def mount_and_keep(
    mounts: Callable[..., MountRecord], image: ImageStore, point: Path, content: bytes
) -> MountRecord:
    """Mount, read big.bin whole (served by the daemon) and wait until it is kept on disk."""
    record = mounts("pt", point, image)
    assert read_whole(point / "big.bin") == content
    wait_metric(record, "materialised_bytes_total", SIZE)
    return record


def until_passthrough(record: MountRecord, path: Path, content: bytes) -> None:
    """Open and read path (always the right bytes) until an open was passed through."""
    deadline = time.monotonic() + 30
    while metric(record, "passthrough_opens_total") == 0:
        assert read_whole(path) == content
        assert time.monotonic() < deadline, "no open was passed through within 30 s"
        time.sleep(0.2)


def kept_files(store: ImageStore) -> list[Path]:
    return sorted((store.root / "files").glob("*/*"))


def test_big_file_read_whole_is_then_read_by_the_kernel(
    image: ImageStore, tmp_path: Path, content: bytes, mounts: Callable[..., MountRecord]
) -> None:
    point = tmp_path / "mnt"
    record = mount_and_keep(mounts, image, point, content)  # cold: the daemon serves it
    assert (point / "small.txt").read_text().startswith("small")
    [kept] = kept_files(image)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert kept.read_bytes() == content
    served = settle(record)["fastboot_imagefs_read_bytes_total"]

    assert read_whole(point / "big.bin") == content
    with open(point / "big.bin", "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[SIZE - 4096 :] == content[SIZE - 4096 :]
        assert m[12345 : 12345 + MiB] == content[12345 : 12345 + MiB]
    after = settle(record)
    assert after["fastboot_imagefs_passthrough_opens_total"] >= 2
    # not one more byte went through the daemon: the kernel read the kept file
    assert after["fastboot_imagefs_read_bytes_total"] == served


def test_concurrent_readers_get_exact_bytes_while_replies_are_sent_without_the_gil(
    image: ImageStore, tmp_path: Path, content: bytes, mounts: Callable[..., MountRecord]
) -> None:
    """patches/pyfuse3-read-nogil.patch lets the daemon's threads run while the kernel copies a
    reply out of a chunk buffer: four readers at scattered offsets through a RAM cache of two
    chunks (so buffers are evicted and reused all along) must still get exactly the image's
    bytes, and no reply may come from a buffer handed out again meanwhile."""
    import pyfuse3

    assert pyfuse3.READ_REPLY_RELEASES_GIL  # the provisioned build (provision-fuse.sh)
    point = tmp_path / "mnt"
    options = MountOptions(ram_bytes=8 * MiB, passthrough=False, prefetch=False, record=False)
    record = mounts("pt", point, image, options)
    path = point / "big.bin"
    spans = [(random.Random(n).randrange(SIZE - MiB), MiB) for n in range(48)]
    errors: list[str] = []

    def read_spans(part: list[tuple[int, int]]) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset, length in part:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
                if os.pread(fd, length, offset) != content[offset : offset + length]:
                    errors.append(f"wrong bytes at {offset}+{length}")
        finally:
            os.close(fd)

    readers = [threading.Thread(target=read_spans, args=(spans[i::4],)) for i in range(4)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=120)
    assert not any(reader.is_alive() for reader in readers), "a reader hung"
    assert errors == []
    assert settle(record)["fastboot_imagefs_read_bytes_total"] >= len(spans) * MiB


def test_an_open_served_by_the_daemon_keeps_its_inode_so_until_closed(
    image: ImageStore, tmp_path: Path, content: bytes, mounts: Callable[..., MountRecord]
) -> None:
    point = tmp_path / "mnt"
    record = mounts("pt", point, image)
    first = open(point / "big.bin", "rb", buffering=0)  # noqa: SIM115 (held open on purpose)
    try:
        assert first.read() == content
        wait_metric(record, "materialised_bytes_total", SIZE)
        # The kernel refuses to mix modes on one inode: while `first` is open, opens stay cached.
        assert read_whole(point / "big.bin") == content
        assert settle(record)["fastboot_imagefs_passthrough_opens_total"] == 0
    finally:
        first.close()
    # the daemon sees the release after close() returns: poll with new opens
    until_passthrough(record, point / "big.bin", content)


def test_a_corrupted_kept_file_is_detected_and_never_served(
    image: ImageStore, tmp_path: Path, content: bytes, mounts: Callable[..., MountRecord]
) -> None:
    point = tmp_path / "mnt"
    record = mount_and_keep(mounts, image, point, content)
    umount(point, image)
    [kept] = kept_files(image)
    with open(kept, "r+b") as fh:  # one flipped byte, in the middle of a chunk
        fh.seek(SIZE // 2)
        byte = fh.read(1)
        fh.seek(SIZE // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))

    record = mounts("pt", point, image)
    for _ in range(3):  # the first open starts the check; reads meanwhile come from the daemon
        assert read_whole(point / "big.bin") == content
    wait_metric(record, 'corrupt_chunks_total{tier="materialised"}', 1)
    # read whole again, it is written again, correctly, and then served by the kernel
    wait_metric(record, "materialised_bytes_total", SIZE)
    [rewritten] = kept_files(image)
    assert rewritten.read_bytes() == content
    until_passthrough(record, point / "big.bin", content)


def test_passthrough_off_keeps_every_read_with_the_daemon(
    image: ImageStore, tmp_path: Path, content: bytes, mounts: Callable[..., MountRecord]
) -> None:
    point = tmp_path / "mnt"
    record = mounts("pt", point, image, MountOptions(passthrough=False))
    for _ in range(2):
        assert read_whole(point / "big.bin") == content
    values = settle(record)
    assert values["fastboot_imagefs_passthrough_opens_total"] == 0
    assert values["fastboot_imagefs_materialised_bytes_total"] == 0
    assert values["fastboot_imagefs_read_bytes_total"] >= SIZE
    assert kept_files(image) == []


def test_gc_keeps_the_files_of_kept_images_and_removes_the_rest(
    image: ImageStore, tmp_path: Path, content: bytes, mounts: Callable[..., MountRecord]
) -> None:
    point = tmp_path / "mnt"
    mount_and_keep(mounts, image, point, content)
    stray = image.file_path("ab" * 32)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"not a file of any image")
    report = image.gc(cache_high=1)  # trim everything that may be trimmed
    assert report["files"] == 1 and not stray.exists()
    assert len(kept_files(image)) == 1, "the mounted image's file must survive trimming"
    umount(point, image)
    image.remove_ref("pt")
    image.gc()
    assert kept_files(image) == []


@pytest.fixture
def pulled(tmp_path: Path, content: bytes, remote: Nginx) -> ImageStore:
    """big.bin's image pushed to nginx and pulled (ref and index only) into an empty store."""
    src = tmp_path / "src-remote"
    src.mkdir()
    (src / "big.bin").write_bytes(content)
    origin = ImageStore(tmp_path / "origin")
    build(origin, src, "pt", progress=False)
    origin.push("pt", remote.root)
    host = ImageStore(tmp_path / "host")
    pull(host, "pt", remote.url)
    return host


def cached_chunks(store: ImageStore) -> int:
    return sum(1 for path in (store.root / "cache").glob("*/*") if path.is_file())


def test_a_streamed_file_is_kept_whole_and_then_served_with_the_remote_down(
    pulled: ImageStore,
    remote: Nginx,
    tmp_path: Path,
    content: bytes,
    mounts: Callable[..., MountRecord],
) -> None:
    point = tmp_path / "mnt"
    record = mounts("pt", point, pulled)
    assert read_whole(point / "big.bin") == content
    wait_metric(record, "materialised_bytes_total", SIZE)
    # streamed: no chunk went to the SSD cache, and keeping the file whole fetched nothing
    # more (it was read back from the page cache the reader left)
    assert cached_chunks(pulled) == 0
    assert settle(record)["fastboot_imagefs_remote_raw_bytes_total"] == SIZE
    [kept] = kept_files(pulled)
    assert kept.read_bytes() == content
    umount(point, pulled)

    remote.stop()
    again = mounts("pt", point, pulled)
    until_passthrough(again, point / "big.bin", content)
    after = settle(again)
    assert after.get("fastboot_imagefs_remote_errors_total", 0) == 0
    assert after.get("fastboot_imagefs_remote_raw_bytes_total", 0) == 0


def test_a_stream_that_stops_early_has_its_chunks_cached(
    pulled: ImageStore,
    remote: Nginx,
    tmp_path: Path,
    content: bytes,
    mounts: Callable[..., MountRecord],
) -> None:
    point = tmp_path / "mnt"
    mounts("pt", point, pulled)
    head = 10 * MiB
    with open(point / "big.bin", "rb", buffering=0) as fh:
        assert fh.read(head) == content[:head]
    # closed before the end: the chunks streamed so far are read back and cached
    deadline = time.monotonic() + 30
    while cached_chunks(pulled) < head // (4 * MiB) + 1:
        assert time.monotonic() < deadline, f"{cached_chunks(pulled)} chunks cached after 30 s"
        time.sleep(0.1)
    assert not kept_files(pulled)
    umount(point, pulled)

    remote.stop()
    mounts("pt", point, pulled)
    with open(point / "big.bin", "rb", buffering=0) as fh:
        assert fh.read(head) == content[:head]  # from the SSD cache: the remote is down


def test_an_unmount_right_after_a_stream_still_keeps_the_file(
    pulled: ImageStore,
    remote: Nginx,
    tmp_path: Path,
    content: bytes,
    mounts: Callable[..., MountRecord],
) -> None:
    point = tmp_path / "mnt"
    mounts("pt", point, pulled)
    assert read_whole(point / "big.bin") == content
    umount(point, pulled)  # at once: the daemon finishes keeping the file before it exits
    [kept] = kept_files(pulled)
    assert kept.read_bytes() == content

    remote.stop()
    again = mounts("pt", point, pulled)
    until_passthrough(again, point / "big.bin", content)
