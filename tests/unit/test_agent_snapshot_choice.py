"""An agent restores, of one model's snapshots for several host types, the first that fits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fastboot.agent import replicas
from fastboot.errors import ConfigError
from fastboot.router.config import config_from_dict
from fastboot.snapshot import cpu_levels, fingerprint
from fastboot.snapshot.store import Manifest, SnapshotId, SnapshotInvalid, Store

HOST = fingerprint.current("vllm test")


def publish(store: Store, snapshot_id: str, flags: tuple[str, ...]) -> None:
    manifest = Manifest(
        id=SnapshotId(snapshot_id),
        key={"engine": "vllm", "engine_version": "0", "model": {}},
        fingerprint=dataclasses.replace(HOST, cpu_flags=flags),
        oracle={"token_ids": [1]},
        created=1.0,
        cold_boot_s=30.0,
        dump_s=2.0,
        engine_argv=["--port", "1"],
        stdio_pipe="pipe:[7]",
        isolation={"port": 8000},
    )
    with store.partial(SnapshotId(snapshot_id)) as partial:
        (partial / "images").mkdir()
        (partial / "images" / "pages-1.img").write_bytes(b"pages")
        store.publish(partial, manifest)


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> replicas.ReplicaManager:
    store = Store(tmp_path / "snapshots")
    publish(store, "aaa111", (*HOST.cpu_flags, "amx_future"))  # made on a newer CPU
    publish(store, "bbb222", tuple(sorted(cpu_levels.LEVELS["x86-64-v2"])))  # held to v2
    config = replicas.AgentConfig(name="t", store=store, state_dir=tmp_path, slots=2)
    made = replicas.ReplicaManager(config)
    monkeypatch.setattr(made, "_host", lambda engine: HOST)
    return made


def test_the_first_snapshot_that_fits_this_host_is_chosen(
    manager: replicas.ReplicaManager,
) -> None:
    if cpu_levels.missing("x86-64-v2", HOST.cpu_flags):
        pytest.skip("this CPU is below x86-64-v2")
    assert manager.choose(["aaa111", "bbb222"]).id == "bbb222"
    assert manager.choose(["missing", "bbb222"]).id == "bbb222"
    assert manager.unfit(manager.snapshot("bbb222")) is None
    assert "amx_future" in str(manager.unfit(manager.snapshot("aaa111")))


def test_none_fitting_or_none_held_says_why(manager: replicas.ReplicaManager) -> None:
    with pytest.raises(SnapshotInvalid, match=r"aaa111 does not fit this host.*amx_future"):
        manager.choose(["aaa111", "missing"])
    with pytest.raises(replicas.NotFound, match="no snapshot 'missing'"):
        manager.choose(["missing"])


def test_the_router_offers_a_models_snapshots_in_order() -> None:
    models = {"tiny": {"snapshot": "aaa", "snapshots": ["bbb", "ccc"]}}
    config = config_from_dict({"models": models})
    assert config.models[0].candidates == ("aaa", "bbb", "ccc")
    with pytest.raises(ConfigError, match="list of snapshot ids"):
        config_from_dict({"models": {"tiny": {"snapshot": "aaa", "snapshots": "bbb"}}})
