"""Process trees seen through /proc, and starting a child that a Ctrl-C cannot orphan.

Two ways a child outlives what fastboot meant:

- **A signal inside Popen().** fastboot turns SIGINT/SIGTERM into an exception (serve's stop,
  KeyboardInterrupt elsewhere). Raised after the fork but before Popen() returns, it leaves a
  running child that no caller holds, so nobody stops it. `held_signals()` holds the two signals
  until the child is recorded, then delivers them to the handler that was in place.
- **Killing a parent, not its children.** `criu` forks helpers: its kernel-feature probes stop
  themselves (SIGSTOP) until criu wakes or kills them, and a restore's tasks wait for criu. Killed
  alone (as `subprocess.run` does on a timeout or an exception), criu leaves them stopped or
  waiting forever, with criu's command line. Measured: 2 of 40 `criu dump` runs killed in their
  first 80 ms left a stopped child behind. `kill_tree()` stops the parent first, so it cannot
  fork while its descendants are listed, then kills its process group and every descendant.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any


def stat_fields(pid: int) -> list[str] | None:
    """/proc/pid/stat's fields after the command name (state first, then ppid, ...; proc(5)
    numbers them from 3), or None when pid is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children(pid: int) -> list[int]:
    """pid's children (those its main thread started, which is all of them for our children)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def tree_pids(root: int) -> list[int]:
    """root and all its descendants (host pids)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children(pid))
    return pids


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the block, then deliver them to the handlers in place before.
    Only the main thread has signal handlers; elsewhere this holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        arrived.append(signum)

    previous: dict[signal.Signals, Any] = {
        s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for which, handler in previous.items():
            signal.signal(which, handler)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)


def kill_tree(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL proc (started with process_group=0), its process group and all its descendants,
    and reap proc. The others are reaped by their subreaper."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGSTOP)  # it forks no more while its tree is listed
    doomed = tree_pids(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
