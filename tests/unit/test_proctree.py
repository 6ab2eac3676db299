"""Children that a Ctrl-C or a timeout must not orphan (fastboot.proctree, criu._run)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fastboot.proctree import held_signals, kill_tree, tree_pids
from fastboot.snapshot import criu


def family(pids: Path) -> list[str]:
    """A parent whose child stops itself (as criu's kernel probes do) and whose other child left
    the process group (as a restored engine tree does); all wait forever and note their pid."""
    note = f"echo $$ >> {pids}"
    return [
        "sh",
        "-c",
        f"sh -c '{note}; kill -STOP $$; sleep 300' & "
        f"setsid sh -c '{note}; exec sleep 300' & "
        f"{note}; sleep 300",
    ]


def _settled(pids: Path) -> list[int]:
    """The family's pids once all three are there and the stopped one has stopped."""
    deadline = time.monotonic() + 10
    while True:
        noted = [int(x) for x in pids.read_text().split()] if pids.exists() else []
        if len(noted) == 3 and "T" in [_state(pid) for pid in noted]:
            return noted
        assert time.monotonic() < deadline, f"the family never settled: {noted}"
        time.sleep(0.02)


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while left := [pid for pid in pids if _state(pid) not in (None, "Z")]:
        assert time.monotonic() < deadline, f"still running: {[(p, _state(p)) for p in left]}"
        time.sleep(0.02)


def test_kill_tree_kills_stopped_children_and_those_in_other_groups(tmp_path: Path) -> None:
    proc = subprocess.Popen(family(tmp_path / "pids"), process_group=0)
    noted = _settled(tmp_path / "pids")
    assert set(noted) <= set(tree_pids(proc.pid))
    kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL
    _assert_gone(noted)


def test_a_criu_run_that_times_out_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        criu._run(family(tmp_path / "pids"), timeout=3)
    noted = [int(x) for x in (tmp_path / "pids").read_text().split()]
    assert len(noted) == 3
    _assert_gone(noted)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


def test_held_signals_deliver_to_the_handler_after_the_block() -> None:
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    finished = False
    try:
        with pytest.raises(_Stop), held_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # Python would run the handler here, were it not held
            finished = True
        assert finished
        assert signal.getsignal(signal.SIGTERM) is _raise_stop
    finally:
        signal.signal(signal.SIGTERM, previous)
