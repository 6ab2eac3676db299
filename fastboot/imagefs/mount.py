"""Mount and unmount images: the programmatic API behind `fastboot image mount|umount`.

    with mounted("torch-env", Path("/mnt/env")) as record:
        subprocess.run(["/mnt/env/bin/python", "-c", "import torch"], check=True)

`mount` checks everything it can before it starts a daemon (the image exists, its index loads and
matches its digest, the mountpoint is an empty directory and not mounted), clears a mount left by
a dead daemon (lazy unmount), starts the daemon in its own session and waits, with a deadline, for
it to say it is ready; if it dies first, the error carries its log's tail.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from fastboot import envs
from fastboot.errors import DependencyError, MountError
from fastboot.imagefs.config import DaemonConfig, Tuning
from fastboot.imagefs.store import ImageRef, ImageStore, MountRecord, digest_of, pid_alive

logger = logging.getLogger(__name__)

#: Daemons this process started (reaped by umount, so none is left a zombie).
_children: dict[int, subprocess.Popen[bytes]] = {}
BUSY_RETRY_S = 2.0
"""How long `umount` retries an unmount the kernel calls busy before reporting it."""


@dataclass(frozen=True)
class MountOptions(Tuning):
    """How a mount behaves: where missing chunks come from, how long to wait for the daemon,
    and the daemon's knobs (`Tuning`, imagefs/config.py)."""

    remote: str | None = None
    """Base URL to read missing chunks from (default: the one the image was pulled from)."""
    ready_timeout_s: float = 30.0


def reap() -> None:
    """Reap daemons this process started that have exited (so none stays a zombie)."""
    for pid, proc in list(_children.items()):
        if proc.poll() is not None:
            del _children[pid]


def mount_id(mountpoint: str) -> str:
    return digest_of(os.fsencode(mountpoint)).hex()[:16]


def _fusermount() -> str:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise DependencyError("fusermount3 is missing; install FUSE 3 (`apt-get install fuse3`)")
    return tool


def probe(mountpoint: str) -> str:
    """'missing', 'dead' (a FUSE mount whose daemon is gone), 'mounted', 'busy' (a non-empty
    directory) or 'free'."""
    try:
        # statfs, unlike stat, is never answered from the kernel's attribute cache, so it
        # reaches the daemon and fails with ENOTCONN when the daemon is gone.
        os.statvfs(mountpoint)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            return "dead"
        raise MountError(f"cannot use {mountpoint}: {exc}") from exc
    if os.path.ismount(mountpoint):
        return "mounted"
    if not os.path.isdir(mountpoint):
        return "missing"
    with os.scandir(mountpoint) as it:
        return "busy" if next(it, None) is not None else "free"


def _lazy_unmount(mountpoint: str) -> None:
    result = subprocess.run(
        [_fusermount(), "-u", "-z", mountpoint], capture_output=True, text=True, check=False
    )
    if result.returncode != 0 and probe(mountpoint) in ("dead", "mounted"):
        raise MountError(
            f"could not unmount the dead mount at {mountpoint}: {result.stderr.strip()}; "
            f"run `umount -l {mountpoint}` as root"
        )


def mount(
    name: str,
    mountpoint: Path,
    store: ImageStore | None = None,
    options: MountOptions | None = None,
) -> MountRecord:
    """Mount image `name` read-only at `mountpoint`; returns once reads can be served."""
    reap()
    store = (store or ImageStore(envs.image_store())).ensure()
    options = options or MountOptions()
    point = os.path.abspath(mountpoint)
    _make_free(store, point)
    ref = store.read_ref(name)
    remote = options.remote or ref.remote or envs.image_remote()
    _check_index(store, name, ref, remote)
    record_id = mount_id(point)
    log_path = store.mounts_dir / f"{record_id}.log"
    metrics_path = store.mounts_dir / f"{record_id}.prom"
    read_fd, write_fd = os.pipe()
    config = DaemonConfig(
        store=str(store.root),
        name=name,
        index=ref.index,
        mountpoint=point,
        remote=remote,
        metrics_file=str(metrics_path),
        log_level=envs.log_level(),
        ready_fd=write_fd,
        **options.tuning(),
    )
    proc = _start_daemon(config, log_path)
    try:
        answer = _wait_ready(read_fd, proc, options.ready_timeout_s)
    finally:
        os.close(read_fd)
    if answer != b"ready":
        _stop(proc.pid, point)
        why = "did not become ready in time" if answer is None else "exited before mounting"
        raise MountError(
            f"the image daemon for {name} on {point} {why}; its log ({log_path}) ends with:\n"
            + tail(log_path)
        )
    record = MountRecord(
        id=record_id,
        pid=proc.pid,
        mountpoint=point,
        name=name,
        index=ref.index,
        log=str(log_path),
        metrics_file=str(metrics_path),
        metrics_port=options.metrics_port,
    )
    store.write_atomic(store.mounts_dir / f"{record_id}.json", json.dumps(asdict(record)).encode())
    return record


def _make_free(store: ImageStore, point: str) -> None:
    """Clear a mount a dead daemon left at point; MountError unless point is then an empty
    directory with nothing mounted on it."""
    state = probe(point)
    if state == "dead":
        logger.info("%s was left mounted by a dead image daemon; unmounting it lazily", point)
        _lazy_unmount(point)
        _forget_records(store, point)
        state = probe(point)
    if state == "missing":
        raise MountError(f"mountpoint {point} is not a directory; create it (mkdir -p {point})")
    if state == "mounted":
        owner = next((m for m in store.mounts() if m.mountpoint == point), None)
        who = f" (image {owner.name}, daemon pid {owner.pid})" if owner else ""
        raise MountError(
            f"mountpoint {point} is busy: something is already mounted there{who}; "
            f"unmount it first (`fastboot image umount {point}`)"
        )
    if state == "busy":
        raise MountError(
            f"mountpoint {point} is busy: the directory is not empty, and mounting would hide "
            "its files; use an empty directory"
        )


def _check_index(store: ImageStore, name: str, ref: ImageRef, remote: str | None) -> None:
    """Load the image's index here, so a malformed or truncated one is a clear error before a
    daemon starts; warn when chunks of packs that are not local can be read from nowhere."""
    index = store.load_index(ref.index)
    if remote is None:
        missing = [p for p in index.pack_names() if not store.has_pack(p)]
        if missing:
            logger.warning(
                "image %s has %d packs that are not local and no remote is set: reads of "
                "chunks not in the cache will fail (give --remote URL)",
                name,
                len(missing),
            )


def _start_daemon(config: DaemonConfig, log_path: Path) -> subprocess.Popen[bytes]:
    """Start the daemon in its own session, its output on log_path, the pipe's write end
    (`config.ready_fd`) passed to it and closed here."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastboot.imagefs.daemon", config.to_json()],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            pass_fds=(config.ready_fd,),
            start_new_session=True,
        )
    finally:
        os.close(log_fd)
        os.close(config.ready_fd)
    _children[proc.pid] = proc
    return proc


def _wait_ready(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> bytes | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            return os.read(fd, 16)  # b"" if the daemon exited without writing
        if proc.poll() is not None:
            return b""
    return None


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _forget_records(store: ImageStore, point: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (store.mounts_dir / f"{mount_id(point)}.json").unlink()


def _stop(pid: int, point: str, timeout: float = 10.0) -> None:
    """SIGTERM (the daemon unmounts itself), then SIGKILL; always reaped if it is our child."""
    proc = _children.pop(pid, None)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, proc, timeout):
        logger.warning("image daemon %d did not stop in %.0f s; killing it", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, proc, 5.0)
    if probe(point) == "dead":
        _lazy_unmount(point)


def _wait_gone(pid: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    if proc is not None:
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def umount(mountpoint: Path, store: ImageStore | None = None, lazy: bool = False) -> None:
    """Unmount an image and wait for its daemon to exit (it saves its profile and metrics)."""
    store = (store or ImageStore(envs.image_store())).ensure()
    point = os.path.abspath(mountpoint)
    record = next((m for m in store.mounts(include_dead=True) if m.mountpoint == point), None)
    state = probe(point)
    if state == "dead":
        _lazy_unmount(point)
    elif state == "mounted":
        command = [_fusermount(), "-u", *(["-z"] if lazy else []), point]
        # Busy a moment is normal: the daemon reads a file it keeps back through the mount, a
        # chunk per open. Only a mount still busy after BUSY_RETRY_S is reported.
        deadline = time.monotonic() + BUSY_RETRY_S
        while True:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            busy = result.returncode != 0 and "busy" in result.stderr.lower()
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if result.returncode != 0:
            if busy:
                raise MountError(
                    f"{point} is busy: processes still use files there (see `fuser -vm "
                    f"{point}`); stop them, or unmount with --lazy"
                )
            raise MountError(f"could not unmount {point}: {result.stderr.strip()}")
    elif record is None:
        raise MountError(f"nothing is mounted at {point}")
    reap()
    if record is not None:
        if not _wait_gone(record.pid, _children.get(record.pid), 30.0):
            logger.warning("image daemon %d still runs after unmount; stopping it", record.pid)
            _stop(record.pid, point)
        _children.pop(record.pid, None)
        _forget_records(store, point)


@contextlib.contextmanager
def mounted(
    name: str,
    mountpoint: Path,
    store: ImageStore | None = None,
    options: MountOptions | None = None,
) -> Iterator[MountRecord]:
    """Mount image `name` at `mountpoint` for the block; always unmounted (and the daemon gone)
    afterwards, lazily if something still uses it."""
    record = mount(name, mountpoint, store, options)
    try:
        yield record
    finally:
        try:
            umount(mountpoint, store)
        except MountError:
            umount(mountpoint, store, lazy=True)
        if pid_alive(record.pid):
            _stop(record.pid, record.mountpoint)
