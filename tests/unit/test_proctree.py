"""Children that a Ctrl-C or a timeout must not orphan (fastboot.host.proctree, criu._run,
fastboot.snapshot.restore.restore_and_adopt)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fastboot.errors import CriuError
from fastboot.host.proctree import held_signals, kill_tree, stat_fields, tree_pids
from fastboot.host.supervisor import EngineTree
from fastboot.snapshot import criu
from fastboot.snapshot.restore import restore_and_adopt


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
    fields = stat_fields(pid)
    return fields[0] if fields else None


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


def _restored_child(workdir: Path, fd: int) -> int:
    """Stands in for `criu restore`: a child of ours (as a restored root is, its subreaper) with
    its output on fd, its pid in the pidfile."""
    child = subprocess.Popen(["sleep", "300"], stdout=fd)
    (workdir / criu.RESTORED_PIDFILE).write_text(f"{child.pid}\n")
    return child.pid


def test_a_tree_restored_but_not_yet_adopted_is_killed(tmp_path: Path) -> None:
    pids: list[int] = []

    def restore_then_ctrl_c(fd: int) -> int:
        pids.append(_restored_child(tmp_path, fd))
        raise _Stop("SIGINT")  # after criu finished, before the caller holds the tree

    with pytest.raises(_Stop):
        restore_and_adopt(tmp_path, restore_then_ctrl_c, "pipe:[0]", io.BytesIO())
    _assert_gone(pids)
    assert not [t for t in EngineTree.live if t.root_pid in pids]


def test_a_restored_tree_is_adopted(tmp_path: Path) -> None:
    tree = restore_and_adopt(
        tmp_path, lambda fd: _restored_child(tmp_path, fd), "pipe:[0]", io.BytesIO()
    )
    try:
        assert tree in EngineTree.live and tree.alive()
    finally:
        tree.stop()
    _assert_gone([tree.root_pid])


def _fake_lazy_pages(tmp_path: Path, body: str) -> criu.Criu:
    """A stand-in for `criu lazy-pages`: the shell body runs with the work dir as $W."""
    script = tmp_path / "criu"
    script.write_text(
        '#!/bin/sh\nwhile [ "$1" != "--work-dir" ]; do shift; done; W="$2"\n'
        f'echo $$ > "$W/daemon.pid"\n{body}\n'
    )
    script.chmod(0o755)
    return criu.Criu(str(script), (4, 2, 1))


def test_a_lazy_pages_daemon_that_never_listens_is_an_error_and_killed(tmp_path: Path) -> None:
    fake = _fake_lazy_pages(tmp_path, "sleep 60")
    with pytest.raises(CriuError, match="lazy-pages"):
        criu.start_lazy_pages(fake, tmp_path, tmp_path, timeout=0.5)
    _assert_gone([int((tmp_path / "daemon.pid").read_text())])


@pytest.mark.parametrize("status", [0, 3])
def test_a_lazy_pages_daemon_is_reaped_and_a_failed_one_takes_its_tree_down(
    tmp_path: Path, status: int
) -> None:
    fake = _fake_lazy_pages(
        tmp_path, f'touch "$W/{criu.LAZY_PAGES_SOCKET}"; sleep 0.3; exit {status}'
    )
    lazy = criu.start_lazy_pages(fake, tmp_path, tmp_path, timeout=5)
    pid = int((tmp_path / "daemon.pid").read_text())
    assert stat_fields(pid) is not None  # still serving pages when the restore would start
    tree = subprocess.Popen(["sleep", "60"])  # stands in for the restored root, our child
    try:
        lazy.watch(tree.pid)
        deadline = time.monotonic() + 10
        while _state(pid) is not None:  # exits on its own and is reaped: not even a zombie stays
            assert time.monotonic() < deadline, f"daemon {pid} is {_state(pid)}"
            time.sleep(0.02)
        if status:  # pages never delivered would read as zeros: the tree must not live on
            assert tree.wait(10) == -signal.SIGKILL
        else:
            for reaper in [t for t in threading.enumerate() if t.name == "criu-lazy-pages"]:
                reaper.join(10)  # done with this daemon: it must have left the tree alone
            assert tree.poll() is None
    finally:
        tree.kill()
        tree.wait()
