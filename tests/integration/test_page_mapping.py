"""Restores that map page images copy-on-write (fastboot's CRIU patch) with real CRIU.

A small process holds 64 MiB of random bytes and answers their SHA-256 over TCP. It is dumped
once and restored several times, one after another: every restore must see exactly the dumped
bytes, a restore's writes must stay in that process (never reach the image, never show in the
next restore), and the mapped restore must really map the image (its /proc/PID/maps names a
pages-*.img) while FASTBOOT_COPY_PAGES=1 must really copy. The same with vLLM and concurrent
replicas is in test_agent (they share the image's memory).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastboot.snapshot import criu as criu_mod
from tests.engine_process import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU dumps and restores need root"),
]

SIZE_MIB = 64
#: Holds SIZE_MIB of random bytes; each connection gets their SHA-256, after changing one byte
#: in every page first when it sent "write".
HOLDER = r"""
import hashlib, os, socket, sys
buf = bytearray(os.urandom(int(sys.argv[1]) << 20))
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[2])))
srv.listen()
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        if conn.recv(16) == b"write":
            for i in range(0, len(buf), 4096):
                buf[i] ^= 0xFF
        conn.sendall(hashlib.sha256(buf).hexdigest().encode())
"""
_PR_SET_CHILD_SUBREAPER = 36


def ask(port: int, command: bytes = b"digest", deadline_s: float = 30.0) -> str:
    """The holder's answer; polls until it listens (a restore takes a moment)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(command)
                return conn.recv(64).decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def image_digest(images: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(images.glob("pages-*.img")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def kill_and_reap(pid: int) -> None:
    os.kill(pid, 9)
    os.waitpid(pid, 0)


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Restored processes are reparented to the nearest subreaper: this test, which reaps them."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def dump_holder(
    criu: criu_mod.Criu, holder: subprocess.Popen[bytes], tmp_path: Path
) -> tuple[Path, str]:
    """Dump holder into tmp_path/images (which kills it); returns the images and its stdout pipe."""
    stdio_pipe = os.readlink(f"/proc/{holder.pid}/fd/1")
    images = tmp_path / "images"
    (tmp_path / "dump").mkdir()
    criu_mod.dump(criu, holder.pid, images, tmp_path / "dump")
    assert holder.wait(timeout=30) != 0  # the dump killed it
    return images, stdio_pipe


def restore(
    criu: criu_mod.Criu, images: Path, workdir: Path, stdio_pipe: str
) -> tuple[int, list[str]]:
    """One restore; returns the restored pid and the image files its memory maps."""
    workdir.mkdir(mode=0o700)
    read_fd, write_fd = os.pipe()
    try:
        pid = criu_mod.restore(criu, images, workdir, stdio_pipe, write_fd)
    finally:
        os.close(write_fd)
        os.close(read_fd)  # the holder prints nothing after "ready"
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return pid, sorted({line.split()[-1] for line in maps if line.endswith(".img")})


def test_mapped_restores_see_the_dump_and_keep_their_writes_private(
    tmp_path: Path, subreaper: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    criu = criu_mod.find_criu()
    if not criu.maps_pages:
        pytest.skip(f"{criu.path} lacks fastboot's patch (`fastboot install-criu` builds it)")
    monkeypatch.delenv("FASTBOOT_COPY_PAGES", raising=False)
    port = free_port()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(SIZE_MIB), str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Its own session: CRIU refuses a tree whose session leader it cannot see, as where the
        # test runner's session began outside this pid namespace (CI containers).
        start_new_session=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
        dumped = ask(port)
        images, stdio_pipe = dump_holder(criu, holder, tmp_path)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    image = image_digest(images)

    pid, mapped = restore(criu, images, tmp_path / "first", stdio_pipe)
    try:
        assert mapped and all(Path(m).name.startswith("pages-") for m in mapped), mapped
        assert ask(port) == dumped
        written = ask(port, b"write")
        assert written != dumped and ask(port) == written
    finally:
        kill_and_reap(pid)
    assert image_digest(images) == image, "a restore's writes reached the page image"

    pid, mapped = restore(criu, images, tmp_path / "second", stdio_pipe)
    try:
        assert mapped
        assert ask(port) == dumped, "the next restore saw an earlier restore's writes"
    finally:
        kill_and_reap(pid)

    monkeypatch.setenv("FASTBOOT_COPY_PAGES", "1")
    pid, mapped = restore(criu, images, tmp_path / "copied", stdio_pipe)
    try:
        assert mapped == [], "FASTBOOT_COPY_PAGES=1 still mapped the image"
        assert ask(port) == dumped
    finally:
        kill_and_reap(pid)
