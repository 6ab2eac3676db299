"""`fastboot agent` with real CRIU, real namespaces and real vLLM replicas of one snapshot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from fastboot.host import netns
from fastboot.host.cgroups import ReplicaCgroup
from fastboot.snapshot import criu as criu_mod
from fastboot.snapshot.store import Store
from tests.agents import (
    Agent,
    agent_process,
    complete,
    cpu_seconds,
    host_state,
    memory_kib,
    start_agent,
)
from tests.engine_process import processes_mentioning

pytestmark = pytest.mark.integration


def success_count(base_url: str) -> float:
    """vllm:request_success_total summed over finish reasons, from the replica's /metrics."""
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total{")
    )


@pytest.fixture(scope="module")
def agent(
    isolated_snapshot: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Agent]:
    snapshots, _ = isolated_snapshot
    work = tmp_path_factory.mktemp("agent")
    before = host_state("t")
    limits = ["--replica-memory", "3g", "--replica-cpus", "1.5"]
    with agent_process(
        snapshots, work / "state", work / "agent.log", name="t", slots=3, extra=limits
    ) as a:
        yield a
    assert host_state("t") == before


def test_token_and_bad_requests_change_nothing(
    agent: Agent, isolated_snapshot: tuple[Path, str]
) -> None:
    _, snapshot_id = isolated_snapshot
    body = {"snapshot": snapshot_id, "count": 1}
    assert agent.call("POST", "/v1/replicas", body, token="")[0] == 401
    assert agent.call("POST", "/v1/replicas", body, token="wrong")[0] == 401
    assert agent.call("GET", "/v1/replicas", token="wrong")[0] == 401
    status, error = agent.call("POST", "/v1/replicas", {"snapshot": "0000dead", "count": 1})
    assert status == 404 and "no snapshot" in error["error"]["message"]
    status, error = agent.call("POST", "/v1/replicas", {"snapshot": snapshot_id, "count": 4})
    assert status == 409 and "3 of 3 slots free" in error["error"]["message"]
    assert agent.call("POST", "/v1/replicas", {"snapshot": snapshot_id, "count": 0})[0] == 400
    assert agent.call("DELETE", "/v1/replicas/nope")[0] == 404
    assert agent.ok("GET", "/v1/replicas")["replicas"] == []  # nothing was started
    assert not netns.ours("fb-t-")
    resources = agent.ok("GET", "/v1/resources")
    assert resources["kind"] == "cpu" and resources["slots_free"] == 3
    (listed,) = agent.ok("GET", "/v1/snapshots")["snapshots"]
    assert listed["id"] == snapshot_id and listed["size_bytes"] > 0


def test_three_replicas_of_one_snapshot_serve_independently(
    agent: Agent, isolated_snapshot: tuple[Path, str]
) -> None:
    _, snapshot_id = isolated_snapshot
    started = agent.call("POST", "/v1/replicas", {"snapshot": snapshot_id[:8], "count": 3})
    assert started[0] == 202, started
    replicas = [agent.wait_ready(r["id"]) for r in started[1]["replicas"]]
    assert len({r["address"] for r in replicas}) == 3
    assert len(netns.ours("fb-t-")) == 3
    # Each replica's processes sit in their own cgroup, with the limits asked for.
    for replica in replicas:
        group = ReplicaCgroup("t", str(replica["id"]))
        assert group.memory_limit() == 3 << 30
        cgroups = Path(f"/proc/{replica['pid']}/cgroup").read_text()
        assert f"fastboot/t/{replica['id']}" in cgroups
    # Same snapshot, same greedy answer; each through its own address.
    answers = {complete(r) for r in replicas}
    assert len(answers) == 1 and answers != {""}
    # Independent engines: each counts only what it served.
    before = [success_count(str(r["base_url"])) for r in replicas]
    for i, replica in enumerate(replicas):
        for _ in range(i + 1):
            complete(replica, f"request for replica {i}")
    served = [success_count(str(r["base_url"])) - b for r, b in zip(replicas, before, strict=True)]
    assert served == [1, 2, 3]
    # With fastboot's CRIU patch the replicas map the snapshot's page images copy-on-write:
    # what no replica wrote is held once, so each one's proportional share (PSS) is well below
    # its resident size. Copied pages would make the two equal.
    if criu_mod.find_criu().maps_pages:
        for replica in replicas:
            rss, pss = memory_kib(int(replica["pid"]))
            assert pss < 0.75 * rss, (replica["id"], rss, pss)
    # Idle after a request, a replica leaves the host's cores alone: fastboot's plugin limits
    # vLLM's shared-memory readers to a 20 ms spin on CPU (stock vLLM spins 1 s in the worker
    # and the EngineCore after every message).
    complete(replicas[0], "one more")
    time.sleep(0.1)
    before_idle = cpu_seconds(int(replicas[0]["pid"]))
    time.sleep(1.0)
    assert cpu_seconds(int(replicas[0]["pid"])) - before_idle < 0.3

    # Kill one: the agent notices within seconds and cleans its namespace; the others serve on.
    victim, *others = replicas
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (state := agent.ok("GET", f"/v1/replicas/{victim['id']}"))["state"] != "dead":
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert "-9" in state["error"]
    deadline = time.monotonic() + 10
    while len(netns.ours("fb-t-")) != 2:
        assert time.monotonic() < deadline, netns.ours("fb-t-")
        time.sleep(0.2)
    assert all(complete(r) in answers for r in others)

    for replica in others:
        assert agent.ok("DELETE", f"/v1/replicas/{replica['id']}")["state"] == "stopped"
    assert not netns.ours("fb-t-") and not netns.host_links("fbth")
    assert not [
        p for p in processes_mentioning("vllm serve") if str(replicas[1]["pid"]) in p.split()[0]
    ]


def test_killed_agent_leaves_nothing_after_restart(
    isolated_snapshot: tuple[Path, str], tmp_path: Path
) -> None:
    snapshots, snapshot_id = isolated_snapshot
    before = host_state("k")
    agent = start_agent(snapshots, tmp_path / "state", tmp_path / "agent.log", name="k", slots=1)
    try:
        (replica,) = agent.ok("POST", "/v1/replicas", {"snapshot": snapshot_id, "count": 1})[
            "replicas"
        ]
        replica = agent.wait_ready(replica["id"])
        os.killpg(agent.proc.pid, signal.SIGKILL)  # the agent only: the replica lives on
        agent.proc.wait()
        assert Path(f"/proc/{replica['pid']}").exists() and netns.ours("fb-k-")
    finally:
        agent.stop()
    again = start_agent(snapshots, tmp_path / "state", tmp_path / "agent2.log", name="k", slots=1)
    try:
        assert "removed what a previous agent left: netns fb-k-0" in again.log.read_text()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{replica['pid']}").exists():
            assert time.monotonic() < deadline, "the orphaned replica still runs"
            time.sleep(0.1)
        assert again.ok("GET", "/v1/replicas")["replicas"] == []
    finally:
        assert again.stop() == 0
    assert host_state("k") == before


def test_without_privilege_a_restore_fails_clearly_and_leaves_nothing(
    isolated_snapshot: tuple[Path, str], tmp_path: Path
) -> None:
    snapshots, snapshot_id = isolated_snapshot
    before = host_state("np")
    # root, but with an empty capability bounding set: no namespaces can be made.
    prefix = ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--"]
    with agent_process(
        snapshots, tmp_path / "state", tmp_path / "agent.log", name="np", slots=1, prefix=prefix
    ) as agent:
        (replica,) = agent.ok("POST", "/v1/replicas", {"snapshot": snapshot_id, "count": 1})[
            "replicas"
        ]
        replica = agent.ok("GET", f"/v1/replicas/{replica['id']}?wait=ready&timeout=60")
        assert replica["state"] == "failed"
        assert "ip netns add" in replica["error"] and "not permitted" in replica["error"]
        assert agent.ok("GET", "/v1/resources")["slots_free"] == 1
    assert host_state("np") == before


@pytest.fixture
def host_b() -> Iterator[netns.Link]:
    """A second "host": a network namespace with a veth to this one."""
    link = netns.create("fbtest-hostb", "fbtesthb", "10.214.9.0/24", 0)
    try:
        yield link
    finally:
        netns.delete(link)


def test_a_second_host_pulls_the_snapshot_and_serves_it(
    isolated_snapshot: tuple[Path, str], tmp_path: Path, host_b: netns.Link
) -> None:
    snapshots, snapshot_id = isolated_snapshot
    from fastboot.serve import free_port

    # Host A's agent, reachable from host B at the host end of B's link.
    with agent_process(
        snapshots,
        tmp_path / "a",
        tmp_path / "a.log",
        name="xa",
        listen_host=host_b.host_ip,
        slots=1,
    ) as a:
        prefix = ["ip", "netns", "exec", host_b.netns]
        with agent_process(
            tmp_path / "b-snapshots",
            tmp_path / "b",
            tmp_path / "b.log",
            name="xb",
            listen_host=host_b.ip,
            port=free_port(),
            slots=1,
            prefix=prefix,
        ) as b:
            assert b.ok("GET", "/v1/snapshots")["snapshots"] == []
            status, wrong = b.call(
                "POST",
                "/v1/snapshots/pull",
                {"source": a.url, "snapshot": snapshot_id, "token": "wrong"},
            )
            assert status == 422 and "401" in wrong["error"]["message"]
            assert not (tmp_path / "b-snapshots" / snapshot_id).exists()
            pulled = b.ok(
                "POST",
                "/v1/snapshots/pull",
                {"source": a.url, "snapshot": snapshot_id, "token": a.token},
            )
            assert pulled["id"] == snapshot_id
            assert (
                Store(tmp_path / "b-snapshots").verify(snapshot_id).total_bytes
                == pulled["size_bytes"]
            )
            (replica,) = b.ok("POST", "/v1/replicas", {"snapshot": snapshot_id, "count": 1})[
                "replicas"
            ]
            replica = b.wait_ready(replica["id"])
            # The replica lives in host B's network: ask it from there.
            script = (
                "import json,sys,urllib.request as u;"
                "r=u.Request(sys.argv[1]+'/completions',data=json.dumps({'model':sys.argv[2],"
                "'prompt':'hello','max_tokens':4,'temperature':0}).encode(),"
                "headers={'content-type':'application/json'});"
                "print(json.load(u.urlopen(r,timeout=60))['choices'][0]['text'])"
            )
            answer = subprocess.run(
                [*prefix, sys.executable, "-c", script, replica["base_url"], replica["model"]],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            ).stdout.strip()
            assert answer
    assert not netns.ours("fb-xb-") and not netns.ours("fb-xa-")


def test_serve_isolated_restores_the_agents_snapshot_on_the_users_port(
    isolated_snapshot: tuple[Path, str], tiny_model: Path, tmp_path: Path
) -> None:
    """`fastboot serve --fastboot-isolated` with the flags the snapshot was created with finds
    that very snapshot (--host/--port are the relay's, not the engine's) and serves it."""
    from fastboot.serve import free_port
    from tests.agents import isolated_flags
    from tests.engine_process import FastbootRun

    snapshots, snapshot_id = isolated_snapshot
    port = free_port()
    argv = [str(tiny_model), "--host", "127.0.0.1", "--port", str(port), *isolated_flags()]
    argv += ["--fastboot-isolated", "--fastboot-snapshot-dir", str(snapshots)]
    run = FastbootRun(argv, tmp_path / "serve.log")
    try:
        run.wait_for(f"serving on 127.0.0.1:{port}", 300)
        assert run.wait_for(r"restored snapshot (\w+)", 1)[1] == snapshot_id[:12]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        chat = client.chat.completions.create(
            model=str(tiny_model), messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert chat.choices[0].message.content
        stream = client.completions.create(
            model=str(tiny_model), prompt="hello", max_tokens=4, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in stream) == complete(
            {"base_url": f"http://127.0.0.1:{port}/v1", "model": str(tiny_model)}
        )
        # The port is taken now: a second run says so before booting anything.
        busy = FastbootRun(argv, tmp_path / "busy.log")
        assert busy.proc.wait(60) == 1
        assert f"port {port} on 127.0.0.1 is busy" in busy.text()
    finally:
        assert run.interrupt(signal.SIGINT) == 0
    assert not [n for n in netns.ours("fb-serve-")]
    assert not processes_mentioning(str(tiny_model) + " --max-model-len")


def test_serve_isolated_first_run_makes_the_snapshot_snapshot_create_makes(
    isolated_snapshot: tuple[Path, str], tiny_model: Path, tmp_path: Path
) -> None:
    """With no snapshot yet, `fastboot serve --fastboot-isolated` runs the one boot sequence in
    its namespace (cold boot, dump, the proving restore, which serves): its snapshot has the id
    `fastboot snapshot create` gave the same flags (one key function for every layout), and
    what it leaves is only that snapshot."""
    from fastboot.serve import free_port
    from tests.agents import isolated_flags
    from tests.engine_process import FastbootRun

    _, snapshot_id = isolated_snapshot
    snapshots, port = tmp_path / "snapshots", free_port()
    argv = [str(tiny_model), "--host", "127.0.0.1", "--port", str(port), *isolated_flags()]
    argv += ["--fastboot-isolated", "--fastboot-snapshot-dir", str(snapshots)]
    run = FastbootRun(argv, tmp_path / "serve.log")
    try:
        run.wait_for(f"serving on 127.0.0.1:{port}", 900)
        assert run.wait_for(r"no snapshot (\w+) yet: cold boot", 1)[1] == snapshot_id[:12]
        assert run.wait_for(r"restored snapshot (\w+)", 1)[1] == snapshot_id[:12]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        reply = client.completions.create(
            model=str(tiny_model), prompt="hello", max_tokens=4, temperature=0
        )
        assert reply.choices[0].text
    finally:
        assert run.interrupt(signal.SIGINT) == 0
    (manifest,) = Store(snapshots).list()
    assert not isinstance(manifest, Exception) and manifest.id == snapshot_id
    assert manifest.isolation == {"port": 8000}
    assert not netns.ours("fb-serve-")
    assert not processes_mentioning(str(tiny_model) + " --max-model-len")
