"""An agent restoring replicas of a snapshot it has never held, lazily from a remote (nginx).

The session's isolated snapshot is pushed (`fastboot snapshot push`) into a directory nginx
serves; agents with an empty snapshot directory and image store restore it from there with
`POST /v1/replicas` alone (no pull). Faults: page-image chunks corrupted on the remote, and the
remote going away as the restore starts; each replica fails with its reason and leaves nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastboot.imagefs.index import ImageIndex
from fastboot.imagefs.testing import Nginx
from fastboot.snapshot.store import Store
from tests.agents import Agent, agent_process, complete, host_state
from tests.engine_process import log_tail, processes_mentioning

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU, namespaces and FUSE need root"),
]


@dataclass
class Published:
    snapshot_id: str
    root: Path
    served: Path
    server: Nginx

    def url(self, store: str = "") -> str:
        return f"{self.server.url}/{store}".rstrip("/")


@pytest.fixture(scope="module")
def published(
    isolated_snapshot: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Published]:
    snapshots, snapshot_id = isolated_snapshot
    root = tmp_path_factory.mktemp("agent-lazy")
    os.chmod(root, 0o755)  # nginx workers read the served directory
    served = root / "served"
    cli = [sys.executable, "-m", "fastboot", "snapshot", "--dir", str(snapshots), "push"]
    done = subprocess.run(
        [*cli, snapshot_id, "--to", str(served), "--store", str(root / "origin")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"pushed {snapshot_id} to {served}"), done.stdout
    server = Nginx(served, root / "nginx")
    server.start()
    try:
        yield Published(snapshot_id, root, served, server)
    finally:
        server.stop()


@pytest.fixture
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host that never saw the snapshot: its own FASTBOOT_HOME (image store, mounts)."""
    home = tmp_path / "home"
    monkeypatch.setenv("FASTBOOT_HOME", str(home))
    return home


@contextlib.contextmanager
def lazy_agent(published: Published, work: Path, name: str, remote: str) -> Iterator[Agent]:
    before = host_state(name)
    with agent_process(
        work / "snapshots",  # empty
        work / "state",
        work / "agent.log",
        name=name,
        slots=2,
        extra=["--snapshot-remote", remote],
    ) as agent:
        yield agent
    assert host_state(name) == before
    assert not processes_mentioning("fastboot.imagefs.daemon") or all(
        str(work) not in p for p in processes_mentioning("fastboot.imagefs.daemon")
    )


def wait_finished(agent: Agent, replica_id: str, timeout_s: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replica = agent.ok("GET", f"/v1/replicas/{replica_id}")
        if replica["state"] not in ("restoring",):
            return replica  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"replica {replica_id} still restoring:\n{log_tail(agent.log)}")


@pytest.mark.parametrize("mode", ["copy", "mount"])
def test_replicas_restore_from_the_remote_with_no_pull(
    published: Published,
    tmp_path: Path,
    fresh_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    monkeypatch.setenv("FASTBOOT_SNAPSHOT_FETCH", mode)
    with lazy_agent(published, tmp_path, "la", published.url()) as agent:
        assert agent.ok("GET", "/v1/snapshots")["snapshots"] == []
        body = {"snapshot": published.snapshot_id, "count": 2}
        replicas = agent.ok("POST", "/v1/replicas", body)["replicas"]
        ready = [agent.wait_ready(r["id"]) for r in replicas]
        for replica in ready:
            assert complete(replica)  # the agent checked its oracle before calling it ready
        log = agent.log.read_text()
        verb = "fetched" if mode == "copy" else "mounted"
        assert log.count(f"{verb} snapshot {published.snapshot_id[:12]} from") >= 1, log[-3000:]
        # Brought once for both replicas, then made whole in the background: a fetched
        # snapshot's digests confirmed (it is a local snapshot now), a mounted one's chunks
        # all in this host's SSD cache.
        done = "every file matches its manifest" if mode == "copy" else "is all local"
        deadline = time.monotonic() + 120
        while done not in agent.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert done in agent.log.read_text(), log_tail(agent.log)
        local = (tmp_path / "snapshots" / published.snapshot_id).is_dir()
        assert local == (mode == "copy")
        if mode == "mount":
            cache = fresh_home / "images" / "cache"
            assert sum(p.stat().st_size for p in cache.glob("*/*")) > 100 << 20
        # A third replica restores from what is here now.
        for replica in ready:
            agent.ok("DELETE", f"/v1/replicas/{replica['id']}")
        (third,) = agent.ok("POST", "/v1/replicas", {**body, "count": 1})["replicas"]
        assert complete(agent.wait_ready(third["id"]))
        agent.ok("DELETE", f"/v1/replicas/{third['id']}")
    assert not list((fresh_home / "mounts").glob("*/*")), "the snapshot's mount is gone"


def corrupt_page_images(store: Path) -> int:
    """Flip a byte in every chunk of every page image in the remote store; how many."""
    (index_file,) = (store / "index").iterdir()
    index = ImageIndex(index_file.read_bytes())
    flipped = 0
    for entry in range(1, len(index)):
        if index.is_regular(entry) and "/pages-" in index.path(entry):
            for k in range(index.chunk_count(entry)):
                chunk = index.file_chunk(entry, k)
                with open(store / "packs" / f"{chunk.pack}.pack", "r+b") as pack:
                    pack.seek(chunk.offset + chunk.length // 2)
                    byte = pack.read(1)
                    pack.seek(chunk.offset + chunk.length // 2)
                    pack.write(bytes([byte[0] ^ 0xFF]))
                flipped += 1
    return flipped


@pytest.mark.parametrize("mode", ["copy", "mount"])
def test_chunks_corrupted_on_the_remote_fail_the_replica_before_it_serves(
    published: Published,
    tmp_path: Path,
    fresh_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    monkeypatch.setenv("FASTBOOT_SNAPSHOT_FETCH", mode)
    copy = published.served / "corrupt"
    if not copy.exists():
        shutil.copytree(published.served, copy, ignore=shutil.ignore_patterns("corrupt", "tmp"))
        assert corrupt_page_images(copy) > 10
    with lazy_agent(published, tmp_path, "lc", published.url("corrupt")) as agent:
        body = {"snapshot": published.snapshot_id, "count": 1}
        (replica,) = agent.ok("POST", "/v1/replicas", body)["replicas"]
        done = wait_finished(agent, replica["id"])
        assert done["state"] == "failed", done
        if mode == "copy":
            # A flipped byte of a compressed chunk may already break its zstd frame.
            assert re.search("does not match its digest|does not decompress", done["error"]), done
        else:  # the daemon refused the chunk (EIO): the engine faulted or criu failed
            mounts = fresh_home / "images" / "mounts"
            daemon_logs = "".join(p.read_text() for p in mounts.glob("*.log"))
            assert "corrupt" in daemon_logs, daemon_logs[-3000:]
        assert Store(tmp_path / "snapshots").list() == []  # nothing partial published


def test_the_remote_dying_as_the_restore_starts_fails_cleanly_and_recovers(
    published: Published, tmp_path: Path, fresh_home: Path
) -> None:
    with lazy_agent(published, tmp_path, "ld", published.url()) as agent:
        body = {"snapshot": published.snapshot_id, "count": 1}
        (replica,) = agent.ok("POST", "/v1/replicas", body)["replicas"]
        published.server.stop()  # mid-fetch: the POST returned once the record was read
        try:
            done = wait_finished(agent, replica["id"])
            assert done["state"] == "failed", done
            assert "is the remote up and reachable" in str(done["error"]), done
            assert Store(tmp_path / "snapshots").list() == []  # nothing partial published
            assert not processes_mentioning("fb-ld-")
        finally:
            published.server.start()
        # Back: the next replica fetches it again and serves.
        (again,) = agent.ok("POST", "/v1/replicas", body)["replicas"]
        assert complete(agent.wait_ready(again["id"]))
        agent.ok("DELETE", f"/v1/replicas/{again['id']}")
    assert [m.id for m in Store(tmp_path / "snapshots").list()] == [published.snapshot_id]
