"""`fastboot router` before a REAL `fastboot agent`, driven by the official openai client.

The agent (tests/agents.py) restores replicas of the session's isolated snapshot of the tiny
model (conftest `isolated_snapshot`), each a CRIU restore of `vllm serve` in its own network
namespace, reachable over a veth. The router runs as its own process
(`python -m fastboot router --config FILE`) and knows the agent only by its URL and token. One
restore serves most of the module: the first test scales from zero, the next ones reuse that
replica, the crash test SIGKILLs it and sees the router replace it, the last scales the
replacement back to zero.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastboot.host import netns
from tests.agents import Agent, agent_process
from tests.engine_process import EngineProcess, free_port
from tests.fleet import router_process

# A hung request fails its test (with fixture teardown) instead of the whole run. The test body
# only: the first test's set-up may include the session's `fastboot snapshot create`, which has
# its own deadline.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180, func_only=True)]

MODEL = "tiny"
#: The agent's name: its namespaces are fb-rt-N, its host links fbrthN.
NAME = "rt"
#: Not the agents' default 10.213/16: another agent on this host may be using it.
SUBNET = "10.216.0.0/24"
LIVE = ("restoring", "ready")


@pytest.fixture(scope="module")
def agent(
    isolated_snapshot: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Agent]:
    """A real agent with two slots (the crash test's replacement may restore while the
    killed replica is still being cleaned up); leaves no namespace or link behind."""
    snapshots, _ = isolated_snapshot
    work = tmp_path_factory.mktemp("router-agent")
    assert not netns.ours(f"fb-{NAME}-"), "namespaces of an earlier run are still there"
    with agent_process(
        snapshots,
        work / "state",
        work / "agent.log",
        name=NAME,
        slots=2,
        extra=["--subnet", SUBNET],
    ) as a:
        yield a
    assert netns.ours(f"fb-{NAME}-") == [] and netns.host_links(f"fb{NAME}h") == []


@pytest.fixture(scope="module")
def served_name(agent: Agent, isolated_snapshot: tuple[Path, str]) -> str:
    """The name the snapshot's engine serves, as the agent lists it."""
    _, snapshot_id = isolated_snapshot
    (listed,) = agent.ok("GET", "/v1/snapshots")["snapshots"]
    assert listed["id"] == snapshot_id
    name: str = listed["served_model_name"]
    assert name
    return name


def replicas(agent: Agent, states: tuple[str, ...] = LIVE) -> list[dict[str, Any]]:
    """The agent's replicas (GET /v1/replicas) in `states`."""
    listed: list[dict[str, Any]] = agent.ok("GET", "/v1/replicas")["replicas"]
    return [r for r in listed if r["state"] in states]


def router_config(
    path: Path, agent: Agent, snapshot: str, served: str, port: int, **model: object
) -> Path:
    lines = [
        "[router]",
        f"port = {port}",
        "tick_s = 0.5",
        "",
        f"[models.{MODEL}]",
        f'snapshot = "{snapshot}"',
        f"served_model_name = {json.dumps(served)}",
        "concurrency = 4",
        "queue_deadline_s = 120",
        *(f"{key} = {value}" for key, value in model.items()),
        "",
        "[[agents]]",
        f'url = "{agent.url}"',
        f'token = "{agent.token}"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def router(
    agent: Agent,
    isolated_snapshot: tuple[Path, str],
    served_name: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EngineProcess]:
    tmp = tmp_path_factory.mktemp("router")
    port = free_port()
    config = router_config(tmp / "router.toml", agent, isolated_snapshot[1], served_name, port)
    with router_process(config, port, tmp / "router.log") as process:
        yield process


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def client(url: str, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=timeout, max_retries=0)


def wait_until(predicate: Callable[[], object], what: str, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2):
            return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    """Pids whose parent is pid."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid:
                    found.append(int(entry))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_scale_from_zero_serves_the_first_request_and_records_the_cold_start(
    router: EngineProcess, agent: Agent, isolated_snapshot: tuple[Path, str], served_name: str
) -> None:
    assert replicas(agent) == [], "the router must start at zero replicas"
    before = metrics(router.url)
    assert before.get(("router_cold_start_seconds_count", (("model", MODEL),)), 0) == 0
    reply = client(router.url, timeout=120).completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0
    )
    assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 8
    (replica,) = replicas(agent)
    assert replica["state"] == "ready" and replica["snapshot"] == isolated_snapshot[1]
    assert replica["model"] == served_name
    assert len(netns.ours(f"fb-{NAME}-")) == 1
    after = metrics(router.url)
    assert after[("router_cold_start_seconds_count", (("model", MODEL),))] == 1
    boot = after[("router_replica_boot_seconds_sum", (("model", MODEL), ("phase", "total")))]
    ready = after[("router_replica_boot_seconds_sum", (("model", MODEL), ("phase", "ready")))]
    cold = after[("router_cold_start_seconds_sum", (("model", MODEL),))]
    # The router recorded the agent's own restore timing, its placement wrapped that restore,
    # and the first token came after the replica was ready.
    assert ready == pytest.approx(replica["timings"]["ready_s"])
    assert cold >= boot >= ready > 0


def test_models_list_names_the_public_model(router: EngineProcess) -> None:
    assert [m.id for m in client(router.url).models.list().data] == [MODEL]


def test_completion_matches_the_replica_answered_directly(
    router: EngineProcess, agent: Agent
) -> None:
    via_router = client(router.url).completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0
    )
    (replica,) = replicas(agent, ("ready",))
    direct = client(replica["address"]).completions.create(
        model=replica["model"], prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert via_router.choices[0].text == direct.choices[0].text
    assert via_router.choices[0].text


def test_chat_completion(router: EngineProcess) -> None:
    reply = client(router.url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and reply.usage.prompt_tokens > 3


def test_streaming_gives_the_same_text_as_non_streaming(router: EngineProcess) -> None:
    api = client(router.url)
    whole = api.completions.create(model=MODEL, prompt="A B C", max_tokens=8, temperature=0)
    pieces = [
        chunk.choices[0].text
        for chunk in api.completions.create(
            model=MODEL, prompt="A B C", max_tokens=8, temperature=0, stream=True
        )
        if chunk.choices
    ]
    assert len(pieces) > 1
    assert "".join(pieces) == whole.choices[0].text
    m = metrics(router.url)
    assert m[("router_ttfb_seconds_count", (("model", MODEL),))] >= 1


def test_unknown_model_is_a_404_through_the_openai_client(router: EngineProcess) -> None:
    with pytest.raises(openai.NotFoundError):
        client(router.url).completions.create(model="nope", prompt="x", max_tokens=1)


def test_replica_killed_mid_stream_is_a_clean_error_and_is_replaced(
    router: EngineProcess, agent: Agent
) -> None:
    (victim,) = replicas(agent, ("ready",))
    failures = ("router_replica_failures_total", (("model", MODEL), ("reason", "crashed")))
    assert metrics(router.url).get(failures, 0) == 0
    # The tiny model writes a whole answer in well under a second, sometimes before a kill sent
    # at its first token lands. A stopped engine core keeps the request open in the replica
    # (the API server has sent the stream's headers, no token comes) until the kill.
    (core,) = [pid for pid in children(victim["pid"]) if "EngineCore" in cmdline(pid)]
    os.kill(core, signal.SIGSTOP)
    stream = client(router.url, timeout=30).completions.create(
        model=MODEL, prompt="Count:", max_tokens=64, temperature=0, stream=True
    )
    os.kill(victim["pid"], signal.SIGKILL)  # pid 1 of its namespace: the whole engine goes
    killed = time.monotonic()
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        for _ in stream:
            pass
    # The stream ended with an error event at once, not at a client or router timeout.
    assert time.monotonic() - killed < 10
    assert metrics(router.url)[failures] == 1

    def replaced() -> bool:
        ready = replicas(agent, ("ready",))
        return len(ready) == 1 and ready[0]["id"] != victim["id"]

    wait_until(replaced, "a replacement replica", 90)
    gone = agent.ok("GET", f"/v1/replicas/{victim['id']}")
    assert gone["state"] in ("dead", "stopped") and not alive(victim["pid"])
    (replacement,) = replicas(agent)
    assert len(netns.ours(f"fb-{NAME}-")) == 1  # the victim's namespace was removed
    reply = client(router.url).completions.create(
        model=MODEL, prompt="after the crash", max_tokens=4, temperature=0
    )
    assert reply.choices and [r["id"] for r in replicas(agent)] == [replacement["id"]]


def test_scales_back_to_zero_after_idle(
    router: EngineProcess,
    agent: Agent,
    isolated_snapshot: tuple[Path, str],
    served_name: str,
    tmp_path: Path,
) -> None:
    # The module's router would replace the replica we are about to remove: stop it first.
    router.stop()
    port = free_port()
    config = router_config(
        tmp_path / "router.toml",
        agent,
        isolated_snapshot[1],
        served_name,
        port,
        scale_down_delay_s=3,
        stable_window_s=2,
        panic_window_s=1,
    )
    before = {r["id"] for r in replicas(agent)}
    with router_process(config, port, tmp_path / "router.log") as second:
        reply = client(second.url, timeout=120).completions.create(
            model=MODEL, prompt="hello", max_tokens=2, temperature=0
        )
        assert reply.choices
        (replica,) = replicas(agent)
        # Adopted the running replica (if the earlier tests left one) rather than restoring.
        assert not before or before == {replica["id"]}

        def stopped() -> bool:
            return bool(agent.ok("GET", f"/v1/replicas/{replica['id']}")["state"] == "stopped")

        wait_until(stopped, "the idle replica's DELETE", 60)
        assert replicas(agent, (*LIVE, "stopping")) == []
        assert netns.ours(f"fb-{NAME}-") == [] and not alive(replica["pid"])
        assert not answers(replica["address"])
        assert [m.id for m in client(second.url).models.list().data] == [MODEL]
