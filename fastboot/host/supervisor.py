"""The engine process tree fastboot owns: started or restored, watched, stopped, always reaped.

Layout of a cold-booted engine:

    fastboot (child subreaper)
      └─ unshare --pid --fork                     host side of a new pid namespace
           └─ [pid 1] python -m fastboot.host.iouring --setsid -- vllm serve ...
                └─ EngineCore ─ Worker ...        (exec'd into vllm: the API server is pid 1)

The engine is pid 1 of its own pid namespace, so CRIU restores it with the same pids however
often and wherever the host's pids are taken, and when pid 1 exits the kernel kills the rest of
the namespace: no orphans. Its stdout/stderr are one pipe owned by fastboot (a file would grow
after the dump and break the next restore), copied to fastboot's stdout by a thread. A restored
engine's pid 1 is reparented to fastboot, which is a child subreaper for that reason.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO, ClassVar

from fastboot.errors import DependencyError
from fastboot.host import launch, shm
from fastboot.host.proctree import children, held_signals, stat_fields

logger = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Adopt orphaned descendants (a restored engine's root, once criu exits)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class OutputPump(threading.Thread):
    """Copies the engine's output pipe to a sink, keeping the last lines for error messages."""

    def __init__(self, read_fd: int, sink: BinaryIO, keep_lines: int = 40) -> None:
        super().__init__(daemon=True, name="engine-output")
        self._fd = read_fd
        self._sink = sink
        self._tail: collections.deque[bytes] = collections.deque(maxlen=keep_lines)
        self.start()

    def run(self) -> None:
        partial = b""
        with open(self._fd, "rb", buffering=0) as source:
            while chunk := source.read(65536):
                with contextlib.suppress(OSError, ValueError):
                    self._sink.write(chunk)
                    self._sink.flush()
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()
                self._tail.extend(lines)

    def tail(self) -> str:
        return "\n".join(line.decode(errors="replace") for line in self._tail)


class EngineTree:
    """One engine process tree: spawn() or adopt_restored(), then wait()/stop().

    Every tree not yet reaped is in EngineTree.live, so whoever owns the process can stop them
    all on the way out (`stop_all()`), whatever phase an exception or signal interrupted.
    """

    live: ClassVar[set[EngineTree]] = set()

    def __init__(
        self,
        root_pid: int,
        popen: subprocess.Popen[bytes] | None,
        stdio_pipe: str,
        pump: OutputPump,
        shm_at_start: set[str],
        isolated: bool = False,
    ) -> None:
        self.root_pid = root_pid
        """Host pid of the engine's pid 1."""
        self.stdio_pipe = stdio_pipe
        """The engine's stdout pipe as /proc shows it ("pipe:[INODE]")."""
        self._popen = popen  # the unshare process of a cold boot; None when restored
        self._pump = pump
        self.returncode: int | None = None
        self.shm_names: set[str] = set()
        """/dev/shm files put back for a restore; removed once the tree is reaped."""
        self._shm_at_start = shm_at_start
        self.isolated = isolated
        """In its own mount namespace: its /dev/shm is private and goes away with it."""
        EngineTree.live.add(self)

    @classmethod
    def spawn(
        cls, argv: list[str], env: Mapping[str, str], sink: BinaryIO, netns: str | None = None
    ) -> EngineTree:
        """Start argv as pid 1 of a new pid namespace, io_uring blocked, output to sink; with
        netns, also in that network namespace and a new mount namespace (see isolation)."""
        shm_at_start = shm.listing()
        read_fd, write_fd = os.pipe()
        # Not --kill-child: that sets PR_SET_PDEATHSIG, which CRIU restores, and the restored
        # pid 1 was SIGKILLed the moment criu (its parent during restore) exited.
        command = launch.command(argv, netns)
        # Signals wait until the tree is in EngineTree.live: a Ctrl-C raised inside Popen()
        # would leave an engine nobody stops (see fastboot.host.proctree).
        with held_signals():
            try:
                popen = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=write_fd,
                    stderr=write_fd,
                    env=dict(env),
                    start_new_session=True,
                )
            except FileNotFoundError as exc:
                os.close(read_fd)
                raise DependencyError("`unshare` (util-linux) is needed to launch engines") from exc
            finally:
                os.close(write_fd)
            pump = OutputPump(read_fd, sink)
            deadline = time.monotonic() + 30
            while not (kids := children(popen.pid)):
                if popen.poll() is not None or time.monotonic() > deadline:
                    raise DependencyError(
                        f"could not start the engine in a pid namespace (unshare exited "
                        f"{popen.returncode}); run `fastboot doctor`"
                    )
                time.sleep(0.01)
            root = kids[0]
            stdio = os.readlink(f"/proc/{root}/fd/1")
            return cls(root, popen, stdio, pump, shm_at_start, isolated=netns is not None)

    @classmethod
    def adopt_restored(
        cls,
        root_pid: int,
        read_fd: int,
        stdio_pipe: str,
        sink: BinaryIO,
        isolated: bool = False,
    ) -> EngineTree:
        pump = OutputPump(read_fd, sink)
        return cls(root_pid, None, stdio_pipe, pump, shm.listing(), isolated)

    def log_tail(self) -> str:
        """The engine's last output lines."""
        return self._pump.tail()

    def alive(self) -> bool:
        if self.returncode is not None:
            return False
        if self._popen is not None:
            # The namespace's pid 1 dies first; unshare follows it.
            if self._popen.poll() is not None:
                self.returncode = self._popen.returncode
                return False
            return Path(f"/proc/{self.root_pid}").exists() and not _is_zombie(self.root_pid)
        try:
            pid, status = os.waitpid(self.root_pid, os.WNOHANG)
        except ChildProcessError:
            # Not our child (we were not its subreaper when criu exited): watch it in /proc.
            if Path(f"/proc/{self.root_pid}").exists() and not _is_zombie(self.root_pid):
                return True
            self.returncode = -1
            return False
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)
            logger.debug("restored engine %d exited with %s", pid, self.returncode)
            return False
        return True

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the tree to exit (None on timeout); reaps it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.alive():
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.1)
        self._reap_launcher()
        return self.returncode

    def _reap_launcher(self) -> None:
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(10)
            if self._popen.returncode is not None and self.returncode is None:
                self.returncode = self._popen.returncode
        self._pump.join(timeout=5)
        self._remove_shm_files()
        EngineTree.live.discard(self)

    def _remove_shm_files(self) -> None:
        """Remove the engine's /dev/shm files. vLLM's own clean-up does not get to all of them:
        when pid 1 of the namespace exits, the kernel SIGKILLs the rest of the tree (resource
        tracker included), leaving psm_* queues and sem.mp-* semaphores behind. Candidates are
        the files put back for a restore and the engine-made ones that appeared since the tree
        started; any that a live process still uses are left alone. An isolated tree's /dev/shm
        was its own tmpfs, gone with its mount namespace."""
        if self.isolated:
            return
        appeared = {
            n for n in shm.listing() - self._shm_at_start if n.startswith(shm.ENGINE_PREFIXES)
        }
        candidates = self.shm_names | appeared
        if candidates:
            in_use = shm.referenced([int(p) for p in os.listdir("/proc") if p.isdigit()])
            shm.remove(sorted(candidates - in_use))
        self.shm_names.clear()

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM pid 1 (vLLM shuts down cleanly), SIGKILL after grace_s; always reaped."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.root_pid, signal.SIGTERM)
            if self.wait(grace_s) is None:
                logger.warning("engine did not stop within %.0f s; killing it", grace_s)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.root_pid, signal.SIGKILL)
        if self._popen is not None and self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._popen.pid, signal.SIGKILL)
        self.wait()

    def after_dump(self) -> None:
        """The dump killed the tree: reap what is left of it, /dev/shm files included (save
        the ones the snapshot needs first)."""
        self.wait(30)


def stop_all() -> list[EngineTree]:
    """Stop every engine tree this process started or adopted; returns them."""
    trees = list(EngineTree.live)
    for tree in trees:
        tree.stop()
    return trees


def _is_zombie(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is None or fields[0] == "Z"


def stdout_sink() -> BinaryIO:
    return sys.stdout.buffer
