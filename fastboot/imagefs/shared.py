"""An image mounted at a stable path for as long as any fastboot process uses it.

    weights = SharedMount("llama-weights")
    point = weights.acquire()        # $FASTBOOT_HOME/mounts/<index digest[:24]>, read-only
    try:
        ...                          # vllm serve <point> ...; snapshot; restore
    finally:
        weights.release()            # unmounts unless another user still needs it

This is how `fastboot serve --fastboot-weights-image NAME` takes its model from an image.

- **Stable path.** The mountpoint is derived from the image's index digest, so an engine
  snapshotted while it had files open there is restored with the same paths (CRIU reopens open
  and mapped files by path: the mount must exist before `criu restore`), and a different image
  content never lands on the path of another.
- **Users.** Each acquire leaves a file `<mountpoint>.users/<pid>-<start time>-<random>` (the
  start time makes a reused pid not count). `release` removes its own and unmounts when no live
  user is left. Acquire and release run under an exclusive flock of
  `<mountpoint>.lock`, so a second `fastboot serve` of the same image on another port joins the
  mount instead of failing on a busy mountpoint, and the first one's exit leaves it mounted.
- **Pinned.** A mount that was already there when no fastboot process used it (an operator's
  `fastboot image mount`) is marked pinned and never unmounted by `release`.
- **Killed users.** A SIGKILLed `fastboot serve` leaves the mount and its (dead) user file; the
  next acquire joins it and that user's release unmounts it. A killed daemon (ENOTCONN) is
  cleared and mounted again by `mount`.
- **Signals.** SIGINT/SIGTERM that arrive while the mount is being made are held and delivered
  (to the handler that was installed) once the mount is recorded, so the caller's cleanup always
  knows about it: no daemon is left running by a Ctrl-C during `acquire`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastboot import envs
from fastboot.errors import MountError
from fastboot.host.proctree import held_signals, stat_fields
from fastboot.imagefs.mount import MountOptions, mount, probe, umount
from fastboot.imagefs.store import ImageRef, ImageStore

logger = logging.getLogger(__name__)

PINNED = "pinned"


def stable_mountpoint(index: str) -> Path:
    """Where the image with index digest `index` is mounted for fastboot's own use."""
    return envs.home() / "mounts" / index[:24]


def _start_time(pid: int) -> str | None:
    fields = stat_fields(pid)
    return fields[19] if fields else None


def _user_name(pid: int) -> str:
    return f"{pid}-{_start_time(pid)}-{secrets.token_hex(4)}"


def _live(user: str) -> bool:
    pid, started, *_ = [*user.split("-"), ""]
    return pid.isdigit() and _start_time(int(pid)) == started


@contextlib.contextmanager
def _locked(point: Path) -> Iterator[None]:
    point.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(f"{point}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class SharedMount:
    """One process's use of an image at its stable mountpoint (see the module docstring)."""

    def __init__(
        self, name: str, store: ImageStore | None = None, options: MountOptions | None = None
    ) -> None:
        self.name = name
        self.store = store or ImageStore(envs.image_store())
        self.options = options or MountOptions()
        self.ref: ImageRef | None = None
        self.path: Path | None = None
        self._user: Path | None = None

    @property
    def identity(self) -> dict[str, Any]:
        """What a snapshot key records of the image: its content (index digest) and the path
        the engine sees; never the files' own digests (no re-hash through FUSE at each boot)."""
        assert self.ref is not None and self.path is not None, "acquire() first"
        return {"path": str(self.path), "image_index": self.ref.index}

    def acquire(self) -> Path:
        """Mount the image at its stable path, or join the mount that is there; returns it.
        Raises ImageNotFoundError for an unknown name and MountError when it cannot mount."""
        self.store.ensure()
        ref = self.store.read_ref(self.name)
        point = stable_mountpoint(ref.index)
        users = Path(f"{point}.users")
        with held_signals(), _locked(point):
            state = probe(str(point))
            if state == "mounted":
                record = next((m for m in self.store.mounts() if m.mountpoint == str(point)), None)
                if record is None or record.index != ref.index:
                    raise MountError(
                        f"{point} is mounted, but not with image {self.name} of "
                        f"{self.store.root}; unmount it (`fastboot image umount {point}`)"
                    )
                known = users.is_dir() and any(users.iterdir())
                users.mkdir(mode=0o700, exist_ok=True)
                if not known:
                    (users / PINNED).touch()
                logger.info(
                    "image %s is already mounted at %s; sharing it%s",
                    self.name,
                    point,
                    "" if known else " (mounted outside fastboot serve: it stays mounted)",
                )
            else:
                point.mkdir(parents=True, exist_ok=True, mode=0o755)
                shutil.rmtree(users, ignore_errors=True)  # users of an earlier mount
                started = time.monotonic()
                record = mount(self.name, point, self.store, self.options)
                if record.index != ref.index:  # the ref moved between our read and mount()
                    umount(point, self.store)
                    raise MountError(
                        f"image {self.name} changed while it was being mounted; try again"
                    )
                users.mkdir(mode=0o700)
                logger.info(
                    "mounted image %s (%s) at %s in %.2f s",
                    self.name,
                    ref.index[:12],
                    point,
                    time.monotonic() - started,
                )
            user = users / _user_name(os.getpid())
            user.touch()
            self.ref, self.path, self._user = ref, point, user
        return point

    def release(self, busy_timeout_s: float = 10.0) -> None:
        """Drop this process's use; unmount when no live user is left and it is not pinned.
        Call it after every engine that used the mount has exited. Idempotent."""
        user, self._user = self._user, None
        if user is None or self.path is None:
            return
        point = self.path
        with _locked(point):
            with contextlib.suppress(FileNotFoundError):
                user.unlink()
            users = user.parent
            names = [p.name for p in users.iterdir()] if users.is_dir() else []
            alive = [n for n in names if n != PINNED and _live(n)]
            if alive or PINNED in names:
                why = f"in use by {', '.join(alive)}" if alive else "mounted outside fastboot"
                logger.info("leaving image %s mounted at %s (%s)", self.name, point, why)
                return
            started = time.monotonic()
            self._unmount(point, busy_timeout_s)
            shutil.rmtree(users, ignore_errors=True)
            with contextlib.suppress(OSError):
                point.rmdir()
            logger.info(
                "unmounted image %s from %s in %.2f s",
                self.name,
                point,
                time.monotonic() - started,
            )

    def _unmount(self, point: Path, busy_timeout_s: float) -> None:
        """Unmount, retrying while the last users' processes finish exiting; detached lazily
        after `busy_timeout_s` (something outside fastboot still has files open there)."""
        deadline = time.monotonic() + busy_timeout_s
        while probe(str(point)) in ("mounted", "dead"):
            try:
                umount(point, self.store)
                return
            except MountError as exc:
                if time.monotonic() > deadline:
                    logger.warning("%s; detaching it lazily", exc)
                    umount(point, self.store, lazy=True)
                    return
                time.sleep(0.2)
