"""The one boot sequence (fastboot.boot.sequence) against a fake engine and a fake site: the
order of its steps, its fall-backs, and the drift it fixed (the restore timeout, resume hooks
after every restore, the key's env prefixes in every layout)."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fastboot.boot import create, sequence
from fastboot.boot.site import IsolatedSite
from fastboot.engines import Engine, EngineError
from fastboot.host.netns import Link
from fastboot.host.supervisor import EngineTree
from fastboot.serve import ServeConfig, isolated, snapshot_key
from fastboot.snapshot.digests import DigestCache
from fastboot.snapshot.fingerprint import Fingerprint
from fastboot.snapshot.store import Manifest, SnapshotId, Store
from fastboot.snapshot.take import Target

LINK = Link("fb-test", "fbth0", "10.0.0.1", "10.0.0.2")
ORACLE = {"prompt": "p", "max_tokens": 2, "token_ids": [1, 2], "text": "t"}


class FakeTree:
    """What the sequence uses of an EngineTree."""

    root_pid = 0
    isolated = False

    def __init__(self) -> None:
        self.stopped = False

    def alive(self) -> bool:
        return not self.stopped

    def stop(self, grace_s: float = 20.0) -> None:
        self.stopped = True

    def log_tail(self) -> str:
        return "the engine's last words"


@dataclass
class FakeEngine:
    """An Engine adapter that records calls; answers as configured."""

    calls: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=lambda: [1, 2])
    ready: bool = True
    timeouts: list[float] = field(default_factory=list)
    NAME: str = "fake"
    CPU_FLOOR: str = "x86-64-v2"
    ENV_PREFIXES: tuple[str, ...] = ("FAKE_",)
    HAS_PLUGIN: bool = False
    INSTALL_HINT: str = "pip install fake"

    def options(self) -> dict[str, Any]:
        return {}

    def key_paths(self, model: str, engine_argv: list[str]) -> list[str]:
        return []

    def version(self, site_packages: list[str] | None = None) -> str:
        return "1.0"

    def command(self, model: str, engine_argv: list[str], python: Path | None = None) -> list[str]:
        return ["fake-engine", model, *engine_argv]

    def socket_env(self, directory: Path) -> dict[str, str]:
        return {"FAKE_SOCKETS": str(directory)}

    def wait_ready(self, url: str, deadline_s: float, alive: Callable[[], bool]) -> str:
        self.calls.append("ready")
        self.timeouts.append(deadline_s)
        if not self.ready:
            raise EngineError("not ready")
        return "served"

    def warm_up(self, url: str, model: str) -> None:
        self.calls.append("warm_up")

    def oracle(self, url: str, model: str) -> dict[str, Any]:
        self.calls.append("oracle")
        return dict(ORACLE)

    def check_oracle(self, url: str, model: str, recorded: dict[str, Any]) -> None:
        self.calls.append("check_oracle")
        if recorded["token_ids"] != self.token_ids:
            raise EngineError("oracle mismatch")

    def quiesce(self, url: str) -> None:
        self.calls.append("engine.quiesce")

    def resume(self, url: str) -> None:
        self.calls.append("engine.resume")


@dataclass
class FakeSite:
    """A Site that spawns and restores FakeTrees; restore_fails makes every restore raise."""

    calls: list[str]
    restore_fails: bool = False
    url: str = "http://fake"
    layout: str | None = None
    isolation: dict[str, Any] | None = None
    socket_dir: Path | None = None
    spawned_env: dict[str, str] = field(default_factory=dict)

    def engine_argv(self, argv: list[str]) -> list[str]:
        return list(argv)

    def spawn(self, argv: list[str], env: dict[str, str]) -> EngineTree:
        self.calls.append("spawn")
        self.spawned_env = env
        return FakeTree()  # type: ignore[return-value]

    def restore(
        self, snapshot: Path, manifest: Manifest, run_dir: Path, from_mount: bool = False
    ) -> EngineTree:
        self.calls.append("restore")
        if self.restore_fails:
            raise OSError("criu says no")
        return FakeTree()  # type: ignore[return-value]


def host_fp() -> Fingerprint:
    return Fingerprint("cpu", ("sse2",), "x86_64", "6.18", "2.36", "3.11", "fake 1.0")


@pytest.fixture
def hooks_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A --fastboot-hooks module `fake_hooks` that records its calls."""
    log: list[str] = []
    module = types.ModuleType("fake_hooks")
    module.quiesce = lambda url: log.append("hooks.quiesce")  # type: ignore[attr-defined]
    module.resume = lambda url: log.append("hooks.resume")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_hooks", module)
    yield log


@pytest.fixture
def fake_dump(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """dump_and_publish replaced by one that publishes a manifest without CRIU."""
    dumped: list[str] = []

    def dump_and_publish(tree: Any, target: Target, taken: Any, run_dir: Path) -> Manifest:
        dumped.append(target.snapshot_id)
        tree.stop()  # the dump kills the tree
        target.store.path(target.snapshot_id).mkdir(parents=True, exist_ok=True)
        manifest = Manifest(
            id=target.snapshot_id,
            key=target.key,
            fingerprint=target.host,
            oracle=taken.oracle,
            created=0.0,
            cold_boot_s=taken.cold_boot_s,
            dump_s=0.1,
            engine_argv=target.engine_argv,
            stdio_pipe="pipe:[1]",
            model_name=taken.model,
            hooks=target.hooks,
        )
        published[target.snapshot_id] = manifest
        return manifest

    published: dict[str, Manifest] = {}
    monkeypatch.setattr(sequence, "dump_and_publish", dump_and_publish)
    monkeypatch.setattr(
        Store, "verify", lambda self, snapshot_id, cache=None: published[snapshot_id]
    )
    return dumped


def target(tmp_path: Path, hooks: str | None = None) -> Target:
    return Target(
        store=Store(tmp_path / "snapshots"),
        snapshot_id=SnapshotId("abc123"),
        key={"engine": "fake"},
        host=host_fp(),
        engine_argv=[],
        digests=DigestCache(tmp_path / "digests.json"),
        hooks=hooks,
    )


def spec(engine: FakeEngine, **kw: Any) -> sequence.BootSpec:
    return sequence.BootSpec(engine=engine, model="m", engine_argv=["--x"], **kw)


def test_first_boot_snapshots_then_serves_the_proven_restore(
    tmp_path: Path, hooks_log: list[str], fake_dump: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = FakeEngine()
    site = FakeSite(engine.calls)
    goal = target(tmp_path, hooks="fake_hooks")
    tree = sequence.boot(
        spec(engine, hooks="fake_hooks", restore_timeout_s=7.0), site, goal, tmp_path
    )
    assert engine.calls == [
        "spawn", "ready", "warm_up", "oracle", "engine.quiesce",
        "restore", "ready", "engine.resume", "check_oracle",
    ]  # fmt: skip
    assert hooks_log == ["hooks.quiesce", "hooks.resume"]
    assert engine.timeouts == [900.0, 7.0]  # the cold boot's, then the restore's own
    assert tree.alive() and fake_dump == ["abc123"]


def test_an_oracle_mismatch_removes_the_new_snapshot_and_serves_a_cold_boot(
    tmp_path: Path, fake_dump: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = FakeEngine(token_ids=[9])  # the restored copy answers otherwise
    site = FakeSite(engine.calls)
    goal = target(tmp_path)
    tree = sequence.boot(spec(engine), site, goal, tmp_path)
    assert not goal.store.path(goal.snapshot_id).exists()
    assert engine.calls[-2:] == ["spawn", "ready"] and tree.alive()


def test_a_failed_restore_falls_back_to_a_cold_boot(
    tmp_path: Path, fake_dump: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = FakeEngine()
    site = FakeSite(engine.calls, restore_fails=True)
    goal = target(tmp_path)
    goal.store.path(goal.snapshot_id).mkdir(parents=True)
    manifest = Manifest(SnapshotId("abc123"), {}, host_fp(), ORACLE, 0.0, 1.0, 0.1, [], "pipe:[1]")
    monkeypatch.setattr(Store, "verify", lambda self, snapshot_id, cache=None: manifest)
    tree = sequence.boot(spec(engine), site, goal, tmp_path, refresh=False)
    # The old snapshot does not restore: cold boot and a new one, which does not restore either,
    # so it is removed and a second cold boot serves.
    assert engine.calls == [
        "restore", "spawn", "ready", "warm_up", "oracle", "engine.quiesce",
        "restore", "spawn", "ready",
    ]  # fmt: skip
    assert tree.alive() and not goal.store.path(goal.snapshot_id).exists()


def test_every_restore_resumes_with_the_snapshots_hooks_and_its_own_timeout(
    tmp_path: Path, hooks_log: list[str]
) -> None:
    """What the agent calls: before, its restores ran no resume hooks."""
    engine = FakeEngine()
    site = FakeSite(engine.calls)
    manifest = Manifest(
        SnapshotId("abc123"), {}, host_fp(), ORACLE, 0.0, 1.0, 0.1, [], "pipe:[1]",
        hooks="fake_hooks",
    )  # fmt: skip
    adopted: list[object] = []
    tree = sequence.restore(
        engine, site, Store(tmp_path), manifest, tmp_path,
        hooks_module=manifest.hooks, timeout_s=3.5, adopted=adopted.append,
    )  # fmt: skip
    assert adopted == [tree] and engine.timeouts == [3.5]
    assert engine.calls == ["restore", "ready", "engine.resume", "check_oracle"]
    assert hooks_log == ["hooks.resume"]
    engine.token_ids = [7]
    with pytest.raises(EngineError, match="oracle mismatch"):
        sequence.restore(
            engine, site, Store(tmp_path), manifest, tmp_path, hooks_module=None, timeout_s=1
        )


def test_the_agent_restores_with_the_snapshots_hooks_and_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastboot.agent import replicas

    seen: dict[str, Any] = {}

    def restore(
        engine: Engine, site: Any, store: Store, manifest: Manifest, run_dir: Path, **kw: Any
    ) -> Any:
        seen.update(kw, engine=engine.NAME, port=site.port)
        kw["adopted"](FakeTree())
        return None

    monkeypatch.setattr(replicas.sequence, "restore", restore)
    monkeypatch.setattr(replicas.netns, "create", lambda *a: LINK)
    config = replicas.AgentConfig(
        name="t", store=Store(tmp_path), state_dir=tmp_path, slots=1, ready_timeout_s=42.0
    )
    (tmp_path / "logs").mkdir()
    manager = replicas.ReplicaManager(config)
    manifest = Manifest(
        SnapshotId("abc123"), {"engine": "vllm"}, host_fp(), ORACLE, 0.0, 1.0, 0.1, [],
        "pipe:[1]", isolation={"port": 8000}, hooks="tests.hooks_probe",
    )  # fmt: skip
    replica = replicas.Replica("r1", "abc123", "m", 0, 8000, 0.0)
    manager._restore_blocking(replica, manifest, None)
    assert seen["hooks_module"] == "tests.hooks_probe" and seen["timeout_s"] == 42.0
    assert seen["engine"] == "vllm" and replica.state == "ready"
    assert seen["mounted"] is None  # a local snapshot: restored from the store


def test_isolated_boots_use_the_configured_restore_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, `serve --fastboot-isolated` and `snapshot create` waited a literal 120 s."""
    specs: list[sequence.BootSpec] = []
    monkeypatch.setattr(isolated.sequence, "boot", lambda s, *a, **k: specs.append(s))
    site = IsolatedSite(LINK)
    config = ServeConfig(
        model="m", engine_argv=["--port", "9"], snapshot=False, restore_timeout_s=5
    )
    isolated._boot(config, site, tmp_path)
    assert specs[0].restore_timeout_s == 5
    assert specs[0].engine_argv == ["--host", "0.0.0.0", "--port", "8000"]
    assert create.CreateConfig("m", [], Store(tmp_path)).restore_timeout_s == 120.0


def test_the_key_takes_the_engines_env_prefixes_in_every_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the isolated key hard-coded VLLM_ whatever the engine."""
    monkeypatch.setenv("FAKE_KNOB", "1")
    monkeypatch.setenv("VLLM_KNOB", "2")
    monkeypatch.setattr(sequence, "host_fingerprint", lambda engine, version: host_fp())
    engine = FakeEngine()
    site = IsolatedSite(LINK)
    isolated_spec = spec(engine, restore_timeout_s=1.0)
    goal = create.isolated_target(isolated_spec, site, Store(tmp_path), DigestCache(tmp_path / "d"))
    assert goal.key["env"] == {"FAKE_KNOB": "1"} and goal.key["layout"] == "isolated"
    assert goal.isolation == {"port": 8000}
    # The host layout's key over the same values differs by its layout only.
    _, host_key = snapshot_key(ServeConfig(model="m", engine_argv=["--x"], engine="vllm"), "1.0")
    assert host_key["env"] == {"VLLM_KNOB": "2"} and "layout" not in host_key


def test_a_cold_boot_that_never_answers_says_why_with_the_engines_output(tmp_path: Path) -> None:
    engine = FakeEngine(ready=False)
    site = FakeSite(engine.calls, socket_dir=tmp_path / "sockets")
    with pytest.raises(EngineError, match="cold boot failed: not ready; last engine output:\nthe"):
        sequence.cold_boot(spec(engine), site, tmp_path)
    assert site.spawned_env["FAKE_SOCKETS"] == str(tmp_path / "sockets")


@dataclass
class FakeBrought:
    manifest: Manifest
    path: Path
    seconds: float = 0.1
    mounted: bool = True
    rest: int = 0

    def fetch_rest(self) -> None:
        self.rest += 1

    def release(self) -> None:
        return None


def test_an_agent_brings_a_remote_snapshot_once_for_all_its_replicas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import threading
    import time

    from fastboot.agent import replicas

    manifest = Manifest(
        SnapshotId("abc123"), {"engine": "vllm"}, host_fp(), ORACLE, 0.0, 1.0, 0.1, [],
        "pipe:[1]", isolation={"port": 8000},
    )  # fmt: skip
    brought = FakeBrought(manifest, tmp_path / "mnt")
    calls: list[str] = []
    lock = threading.Lock()

    class FakeRemote:
        def record(self, snapshot_id: str) -> Any:
            return types.SimpleNamespace(manifest=manifest) if snapshot_id == "abc123" else None

        def bring(self, record: Any) -> FakeBrought:
            with lock:
                calls.append(record.manifest.id)
            time.sleep(0.2)  # both replicas' tasks are waiting by now
            return brought

    seen: list[Any] = []

    def restore(*args: Any, **kw: Any) -> None:
        seen.append(kw["mounted"])
        kw["adopted"](FakeTree())

    monkeypatch.setattr(replicas.sequence, "restore", restore)
    monkeypatch.setattr(replicas.netns, "create", lambda *a: LINK)
    config = replicas.AgentConfig(
        name="t", store=Store(tmp_path / "snaps"), state_dir=tmp_path, slots=3,
        snapshot_remote="http://remote.invalid",
    )  # fmt: skip
    (tmp_path / "logs").mkdir()
    manager = replicas.ReplicaManager(config)
    manager.remote = FakeRemote()
    monkeypatch.setattr(manager, "unfit", lambda m: None)

    async def run() -> list[replicas.Replica]:
        started = await manager.restore("abc123", 2)
        await asyncio.gather(*manager._tasks)
        with pytest.raises(replicas.NotFound, match="no snapshot other here or on the remote"):
            await manager.restore("other", 1)
        return started

    started = asyncio.run(run())
    assert [r.state for r in started] == ["ready", "ready"]
    assert calls == ["abc123"]  # one fetch/mount for both replicas
    assert seen == [brought.path, brought.path]  # restored from the mount
    assert manager.mounted == {"abc123": brought} and brought.rest == 2
