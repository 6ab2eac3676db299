"""One snapshot per host type, REAL: an agent holding three snapshots of the tiny model picks
the one this host can restore, the router offers them in order, `fastboot doctor` lists them.

The store (one directory, as on a fleet host):
- native: the session's shared isolated snapshot (conftest `isolated_snapshot`), this CPU's flags;
- v3: `fastboot snapshot create --fastboot-cpu-baseline x86-64-v3` (real vLLM, real CRIU), taken
  with VLLM_SERVER_DEV_MODE=1 so the restored worker can be asked what its code runs on;
- foreign: the v3 snapshot's files under another id whose manifest says it was made where the
  code may use a feature this CPU lacks (FOREIGN_FLAG: what a snapshot from an AMX host looks
  like). No host of this kind can make one, so its manifest is the one written by hand; its
  files are real, and its refusal must come before any of them is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fastboot.host import netns
from fastboot.snapshot import cpu_levels, fingerprint
from fastboot.snapshot.store import MANIFEST
from tests.agents import Agent, agent_process, create_snapshot, isolated_flags
from tests.engine_process import free_port
from tests.integration.test_router import client, replicas, router_config, router_process

HOST_FLAGS = set(fingerprint.cpu_info()[1])
#: A feature this CPU lacks, as a snapshot made on a newer CPU would record it.
FOREIGN_FLAG = next(
    f for f in ("amx_tile", "avx512_fp16", "avx10_1", "fastboot_absent") if f not in HOST_FLAGS
)
NAME = "sc"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300, func_only=True),
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU dumps and restores need root"),
    pytest.mark.skipif(
        not cpu_levels.LEVELS["x86-64-v3"] <= HOST_FLAGS,
        reason="holds a snapshot to x86-64-v3: needs a host with at least that level",
    ),
]


@dataclass(frozen=True)
class Fleet:
    home: Path
    """FASTBOOT_HOME: the snapshots live in its snapshots/."""
    native: str
    v3: str
    foreign: str

    @property
    def snapshots(self) -> Path:
        return self.home / "snapshots"


@pytest.fixture(scope="module")
def fleet(
    tiny_model: Path, isolated_snapshot: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Fleet:
    home = tmp_path_factory.mktemp("fleet-home")
    store = home / "snapshots"
    held = [str(tiny_model), *isolated_flags(), "--fastboot-cpu-baseline", "x86-64-v3"]
    v3 = create_snapshot(
        tiny_model, store, home / "create.log", argv=held, env={"VLLM_SERVER_DEV_MODE": "1"}
    )
    shared, native = isolated_snapshot
    _link_tree(shared / native, store / native)
    foreign = hashlib.sha256(b"foreign " + v3.encode()).hexdigest()[: len(v3)]
    _link_tree(store / v3, store / foreign)
    manifest = json.loads((store / v3 / MANIFEST).read_text())
    manifest["id"] = foreign
    flags = manifest["fingerprint"]["cpu_flags"]
    manifest["fingerprint"]["cpu_flags"] = sorted([*flags, FOREIGN_FLAG])
    (store / foreign / MANIFEST).unlink()  # a link to v3's: write a file of its own
    fd = os.open(store / foreign / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(manifest, out)
    return Fleet(home, native, v3, foreign)


def _link_tree(source: Path, target: Path) -> None:
    """A snapshot under another directory without copying its pages (hard links)."""
    shutil.copytree(source, target, copy_function=os.link)


@pytest.fixture(scope="module")
def agent(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    work = tmp_path_factory.mktemp("choice-agent")
    with agent_process(
        fleet.snapshots, work / "state", work / "agent.log", name=NAME, slots=1
    ) as a:
        yield a
    assert netns.ours(f"fb-{NAME}-") == [] and netns.host_links(f"fb{NAME}h") == []


def test_the_agent_says_which_snapshot_fits_and_refuses_the_foreign_one(
    agent: Agent, fleet: Fleet
) -> None:
    listed = {s["id"]: s for s in agent.ok("GET", "/v1/snapshots")["snapshots"]}
    assert set(listed) == {fleet.native, fleet.v3, fleet.foreign}
    assert listed[fleet.native]["cpu_baseline"] == "native" and listed[fleet.native]["fits_host"]
    assert listed[fleet.v3]["cpu_baseline"] == "x86-64-v3" and listed[fleet.v3]["fits_host"]
    foreign = listed[fleet.foreign]
    assert not foreign["fits_host"] and FOREIGN_FLAG in foreign["unfit_reason"], foreign

    status, error = agent.call("POST", "/v1/replicas", {"snapshots": [fleet.foreign], "count": 1})
    assert status == 422, error
    assert FOREIGN_FLAG in error["error"]["message"] and fleet.foreign in error["error"]["message"]
    status, error = agent.call("POST", "/v1/replicas", {"snapshots": ["0000dead"], "count": 1})
    assert status == 404 and "no snapshot" in error["error"]["message"], error
    assert agent.ok("GET", "/v1/replicas")["replicas"] == []
    assert not netns.ours(f"fb-{NAME}-")


def test_the_doctor_lists_each_snapshot_with_its_baseline(fleet: Fleet) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fastboot", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FASTBOOT_HOME": str(fleet.home)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    level = cpu_levels.highest_level(HOST_FLAGS)
    assert level and checks["cpu level"]["detail"].startswith(level)
    snapshots = checks["snapshots"]
    assert snapshots["detail"] == f"2 of 3 in {fleet.snapshots} restore here", snapshots
    lines = {line.split()[0]: line for line in snapshots["items"]}
    assert lines[fleet.native[:12]].endswith("baseline native: restores here"), lines
    assert lines[fleet.v3[:12]].endswith("baseline x86-64-v3: restores here"), lines
    assert FOREIGN_FLAG in lines[fleet.foreign[:12]], lines
    assert "restores here" not in lines[fleet.foreign[:12]], lines


def test_the_router_offers_snapshots_in_order_and_the_agent_restores_the_first_that_fits(
    agent: Agent, fleet: Fleet, tmp_path: Path
) -> None:
    (served,) = {s["served_model_name"] for s in agent.ok("GET", "/v1/snapshots")["snapshots"]}
    port = free_port()
    # The foreign snapshot first, as a fleet whose newest hosts have AMX would list it.
    config = router_config(
        tmp_path / "router.toml",
        agent,
        fleet.foreign,
        served,
        port,
        snapshots=json.dumps([fleet.v3, fleet.native]),
    )
    with router_process(config, port, tmp_path / "router.log") as router:
        reply = client(router.url, timeout=120).completions.create(
            model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0
        )
        assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 8
        (replica,) = replicas(agent)
        assert replica["snapshot"] == fleet.v3, replica
        # The replica runs the v3 snapshot's code: its worker is held to AVX2.
        report = _cpu_report(str(replica["base_url"]))
        assert report["aten"] == "AVX2" and report["vllm_kernels"] == ["_C_AVX2.abi3.so"], report
        assert agent.ok("DELETE", f"/v1/replicas/{replica['id']}")["state"] == "stopped"


def _cpu_report(base_url: str) -> dict[str, Any]:
    url = base_url.removesuffix("/v1") + "/collective_rpc"
    body = json.dumps({"method": "fastboot_cpu_report"}).encode()
    request = urllib.request.Request(url, body, {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        (report,) = json.loads(response.read())["results"]
    assert isinstance(report, dict)
    return report
