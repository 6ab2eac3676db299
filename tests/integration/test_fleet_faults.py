"""Host loss under real load: four real agents in network namespaces as hosts, a real router
process with a buffer of them, two real vLLM CPU replicas (restored), and `vllm bench serve`
sending streamed completions through the router while a host dies.

1. SIGKILL of one serving host (agent and replicas): the router stops routing there within a
   bounded time, restores a replacement on the idle buffer host, and the buffer refills from the
   fourth; every request not in flight on the dead host succeeds, none hangs. The agent,
   restarted as systemd would, comes back with nothing of its old replicas left.
2. A partition (the serving host's veth cut: nothing is reset, connections go silent): the same,
   found by the router's probes alone.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastboot.serve import free_port
from tests.engine_process import EngineProcess
from tests.fleet import (
    FleetHost,
    bench,
    fleet,
    health,
    members,
    router_config,
    router_process,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

HOSTS, REPLICAS = 4, 2
#: The router's host_lost_s (tests/fleet.py's config) plus probe and scheduling slack.
DETECT_S = 6.0
#: Placement + restore + the assignment check, with a 2-core machine's noise.
RESTORE_S = 30.0


@pytest.fixture(scope="module")
def cluster(
    isolated_snapshot: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[FleetHost], EngineProcess, str]]:
    snapshots, snapshot_id = isolated_snapshot
    work = tmp_path_factory.mktemp("fleet")
    with fleet(snapshots, work, HOSTS) as hosts:
        assert hosts[0].agent is not None
        (listed,) = hosts[0].agent.ok("GET", "/v1/snapshots")["snapshots"]
        served = listed["served_model_name"]
        port = free_port()
        config = router_config(work, hosts, snapshot_id, served, port, REPLICAS)
        with router_process(config, port, work / "router.log") as router:
            wait_for(
                "two ready replicas and one idle host", lambda: settled(router), 180, router.log
            )
            yield hosts, router, served


def settled(router: EngineProcess) -> bool:
    """REPLICAS ready on distinct hosts, and one idle host in the buffer."""
    doc = health(router)
    ready = [m for m in doc["models"]["tiny"]["members"] if m["state"] == "ready"]
    idle = [h for h in doc["buffer"] if h["state"] == "idle"]
    return (
        len(ready) == REPLICAS and len({m["agent"] for m in ready}) == REPLICAS and len(idle) == 1
    )


def under_load(
    router: EngineProcess, served: str, tokenizer: Path, out: Path, fault: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`vllm bench serve` (60 prompts at 4/s) through the router, with fault() called 5 s in;
    returns the bench result and what fault() returned."""
    faulted: dict[str, Any] = {}
    errors: list[BaseException] = []

    def inject() -> None:
        time.sleep(5.0)
        try:
            faulted.update(fault())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=inject)
    thread.start()
    try:
        result = bench(router.url, "tiny", tokenizer, 60, 4.0, out, timeout_s=240)
    finally:
        thread.join()
    if errors:
        raise errors[0]
    return result, faulted


def loss_and_recovery(router: EngineProcess, victim: FleetHost, act: Any) -> dict[str, Any]:
    """Do act() to the victim host; time how long until the router stops routing there and
    until the replicas are back to REPLICAS ready (on other hosts) with the buffer refilled."""
    before = members(router)
    inflight = sum(m["inflight"] for m in before if m["agent"] == victim.name)
    act()
    at = time.monotonic()
    after = members(router)
    inflight = max(inflight, sum(m["inflight"] for m in after if m["agent"] == victim.name))
    detect = wait_for(
        "the router to stop routing to the lost host",
        lambda: all(m["agent"] != victim.name for m in members(router)),
        DETECT_S,
        router.log,
    )
    restore = wait_for("capacity back", lambda: settled(router), RESTORE_S, router.log)
    return {"inflight": inflight, "detect_s": detect, "restore_s": restore, "at": at}


def check_load(result: dict[str, Any], inflight: int) -> None:
    """Every request not in flight on the lost host succeeded; none hung."""
    assert result["completed"] + result.get("failed", 0) == 60, result
    failed = 60 - result["completed"]
    assert failed <= inflight, f"{failed} failed, only {inflight} were in flight there"
    # No request outlived the run's deadline (bench's own max end-to-end latency).
    assert result["p100_e2el_ms"] < 60_000, result["p100_e2el_ms"]


def serving_host(router: EngineProcess, hosts: list[FleetHost]) -> FleetHost:
    names = {m["agent"] for m in members(router) if m["state"] == "ready"}
    return next(h for h in hosts if h.name in names)


def test_host_killed_under_load(
    cluster: tuple[list[FleetHost], EngineProcess, str], tiny_model: Path, tmp_path: Path
) -> None:
    hosts, router, served = cluster
    victim = serving_host(router, hosts)
    idle = next(h["name"] for h in health(router)["buffer"] if h["state"] == "idle")
    result, faulted = under_load(
        router,
        served,
        tiny_model,
        tmp_path / "kill.json",
        lambda: loss_and_recovery(router, victim, victim.kill),
    )
    check_load(result, faulted["inflight"])
    # The replacement landed on the host that was idle, restored (not cold-booted)...
    doc = health(router)
    placed = {m["agent"] for m in doc["models"]["tiny"]["members"]}
    assert idle in placed and victim.name not in placed
    new_host = next(h for h in hosts if h.name == idle)
    assert new_host.agent is not None
    (replica,) = [
        r for r in new_host.agent.ok("GET", "/v1/replicas")["replicas"] if r["state"] == "ready"
    ]
    assert replica["timings"]["restore_s"] < 10, replica["timings"]
    # ...the lost host is off the books (it may rejoin) and the buffer refilled from the fourth.
    assert victim.name not in {h["name"] for h in doc["buffer"]}
    # Restarted, the agent leaves nothing of its old replicas: namespaces, links, processes.
    victim.start()
    assert victim.replica_namespaces() == []
    assert victim.replica_links() == []
    assert victim.replica_processes() == []
    assert victim.agent is not None
    mounts = Path(f"/proc/{victim.agent.proc.pid}/mounts").read_text()
    assert f"state{victim.index}/" not in mounts, mounts


def test_host_partitioned_under_load(
    cluster: tuple[list[FleetHost], EngineProcess, str], tiny_model: Path, tmp_path: Path
) -> None:
    hosts, router, served = cluster
    victim = serving_host(router, hosts)
    try:
        result, faulted = under_load(
            router,
            served,
            tiny_model,
            tmp_path / "cut.json",
            lambda: loss_and_recovery(router, victim, victim.cut),
        )
    finally:
        victim.heal()
    check_load(result, faulted["inflight"])
    assert faulted["detect_s"] < DETECT_S
    placed = {m["agent"] for m in members(router)}
    assert victim.name not in placed
    # Healed, its agent still answers (it never died): nothing hangs on it either.
    assert victim.agent is not None and victim.agent.call("GET", "/v1/health")[0] == 200
    subprocess.run(["ip", "link", "show", victim.link.host_if], check=True, capture_output=True)
