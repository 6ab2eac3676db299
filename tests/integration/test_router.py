"""`fastboot router` before a REAL `vllm serve` of the tiny model, driven by the openai client.

The agent is a test-local stand-in (fastboot.router.testing.FakeAgent with hooks) that speaks
docs/agent-api.md: on the router's POST it starts one real `vllm serve` and reports it `ready`
once it answers; on DELETE it stops it. The router runs as its own process
(`python -m fastboot router --config FILE`). One vLLM boot for the whole module: the first test
scales from zero, the others reuse that replica, the last scales it back to zero.

The tests observe the agent only through its HTTP API (`Agent.replicas()`), so switching to the
real agent means replacing the `agent` fixture with one that yields an `Agent` for a running
`fastboot agent` and a snapshot of the tiny model; nothing else changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastboot.models.tiny import cpu_serve_flags
from fastboot.router.testing import FakeAgent
from tests.engine_process import EngineProcess, engine_process, free_port

# A hung request fails its test (with fixture teardown) instead of the whole run.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MODEL = "tiny"
SNAPSHOT = "tiny-standin-snapshot"
TOKEN = "standin-token"


@dataclass
class StandinAgent:
    """A FakeAgent on its own event-loop thread whose replicas are real `vllm serve` processes."""

    tiny_model: Path
    logs: Path
    agent: FakeAgent | None = None
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    engines: dict[str, contextlib.ExitStack] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)
    deleted: set[str] = field(default_factory=set)
    stopping: bool = False

    @property
    def fake(self) -> FakeAgent:
        assert self.agent is not None
        return self.agent

    def start(self) -> str:
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.agent = FakeAgent(
            lambda snapshot: f"http://127.0.0.1:{free_port()}",
            token=TOKEN,
            slots=1,
            ready_after_s=None,
            model=str(self.tiny_model),
            on_create=self._boot_later,
            on_delete=self._stop_later,
        )
        return asyncio.run_coroutine_threadsafe(self.agent.start(), self.loop).result(10)

    def _boot_later(self, replica: dict[str, Any]) -> None:
        thread = threading.Thread(target=self._boot, args=(replica["id"], replica["address"]))
        self.threads.append(thread)
        thread.start()

    def _boot(self, replica_id: str, address: str) -> None:
        vllm = shutil.which("vllm", path=os.path.dirname(sys.executable))
        assert vllm, "the vllm command is not installed beside this Python (run scripts/setup)"
        port = int(address.rsplit(":", 1)[1])
        argv = [vllm, "serve", str(self.tiny_model), "--port", str(port), *cpu_serve_flags()]
        stack = contextlib.ExitStack()
        self.engines[replica_id] = stack
        started = time.monotonic()
        try:
            stack.enter_context(
                engine_process(
                    argv, port, self.logs / f"vllm-{replica_id}.log", ready_deadline_s=300
                )
            )
        except BaseException as exc:
            self.loop.call_soon_threadsafe(self.fake.set_state, replica_id, "failed", str(exc))
            return
        ready_s = time.monotonic() - started
        if self.stopping or replica_id in self.deleted:  # deleted or torn down while booting
            stack.close()
            return

        def ready() -> None:
            self.fake.replicas[replica_id]["timings"] = {"restore_s": ready_s, "ready_s": ready_s}
            self.fake.make_ready(replica_id)

        self.loop.call_soon_threadsafe(ready)

    def _stop_later(self, replica: dict[str, Any]) -> None:
        self.deleted.add(replica["id"])
        if stack := self.engines.get(replica["id"]):
            thread = threading.Thread(target=stack.close)
            self.threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self.stopping = True
        for thread in self.threads:  # a boot ends within engine_process's ready deadline
            thread.join()
        for stack in self.engines.values():
            stack.close()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.fake.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@dataclass(frozen=True)
class Agent:
    """What the tests know of an agent: where it is, its token, the snapshot to ask for."""

    url: str
    token: str
    snapshot: str

    def replicas(self, states: tuple[str, ...] = ("restoring", "ready")) -> list[dict[str, Any]]:
        """GET /v1/replicas, keeping those in `states`."""
        request = urllib.request.Request(
            self.url + "/v1/replicas", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            listed: list[dict[str, Any]] = json.load(response)["replicas"]
        return [r for r in listed if r["state"] in states]


@pytest.fixture(scope="module")
def agent(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    standin = StandinAgent(tiny_model, tmp_path_factory.mktemp("engines"))
    try:
        yield Agent(standin.start(), TOKEN, SNAPSHOT)
    finally:
        standin.stop()


def router_config(path: Path, agent: Agent, port: int, **model: object) -> Path:
    lines = [
        "[router]",
        f"port = {port}",
        "tick_s = 0.5",
        "",
        f"[models.{MODEL}]",
        f'snapshot = "{agent.snapshot}"',
        "concurrency = 4",
        "queue_deadline_s = 240",
        *(f"{key} = {value}" for key, value in model.items()),
        "",
        "[[agents]]",
        f'url = "{agent.url}"',
        f'token = "{agent.token}"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def router_process(config: Path, port: int, log: Path) -> Iterator[EngineProcess]:
    # The router answers /health and lists its models at once, which is what engine_process
    # waits for.
    argv = [sys.executable, "-m", "fastboot", "router", "--config", str(config)]
    with engine_process(argv, port, log, ready_deadline_s=60) as router:
        yield router


@pytest.fixture(scope="module")
def router(agent: Agent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    tmp = tmp_path_factory.mktemp("router")
    port = free_port()
    config = router_config(tmp / "router.toml", agent, port)
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


def client(url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)


def wait_until(predicate: Any, what: str, deadline_s: float) -> None:
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


def test_scale_from_zero_serves_the_first_request_and_records_the_cold_start(
    router: EngineProcess, agent: Agent
) -> None:
    assert agent.replicas() == [], "the router must start at zero replicas"
    before = metrics(router.url)
    assert before.get(("router_cold_start_seconds_count", (("model", MODEL),)), 0) == 0
    reply = client(router.url).completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0
    )
    assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 8
    # One ready replica (a boot that failed, e.g. because another test's /dev/shm clean-up on
    # this shared machine killed it, is replaced by the router, never served).
    (replica,) = agent.replicas()
    assert replica["state"] == "ready" and replica["snapshot"].startswith(agent.snapshot)
    after = metrics(router.url)
    assert after[("router_cold_start_seconds_count", (("model", MODEL),))] == 1
    boot = after[("router_replica_boot_seconds_sum", (("model", MODEL), ("phase", "total")))]
    cold = after[("router_cold_start_seconds_sum", (("model", MODEL),))]
    # The first token came after the replica was ready (a restore may take about a second, a
    # stand-in's cold boot tens of seconds).
    assert cold >= boot > 0.1


def test_models_list_names_the_public_model(router: EngineProcess) -> None:
    assert [m.id for m in client(router.url).models.list().data] == [MODEL]


def test_completion_matches_the_replica_answered_directly(
    router: EngineProcess, agent: Agent
) -> None:
    via_router = client(router.url).completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0
    )
    (replica,) = agent.replicas(("ready",))
    direct = client(replica["address"]).completions.create(
        model=replica["model"], prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert via_router.choices[0].text == direct.choices[0].text


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
    import openai

    with pytest.raises(openai.NotFoundError):
        client(router.url).completions.create(model="nope", prompt="x", max_tokens=1)


def test_scales_back_to_zero_after_idle(
    router: EngineProcess, agent: Agent, tmp_path: Path
) -> None:
    # The module's router would replace the replica we are about to remove: stop it first.
    router.stop()
    port = free_port()
    config = router_config(
        tmp_path / "router.toml",
        agent,
        port,
        scale_down_delay_s=3,
        stable_window_s=2,
        panic_window_s=1,
    )
    before = {r["id"] for r in agent.replicas()}
    with router_process(config, port, tmp_path / "router.log") as second:
        reply = client(second.url).completions.create(
            model=MODEL, prompt="hello", max_tokens=2, temperature=0
        )
        assert reply.choices
        (replica,) = agent.replicas()
        # Adopted the running replica (if the earlier tests left one) rather than booting another.
        assert not before or before == {replica["id"]}
        wait_until(lambda: agent.replicas() == [], "the idle replica's DELETE", 60)
        wait_until(lambda: not answers(replica["address"]), "the engine to stop serving", 60)
        assert [m.id for m in client(second.url).models.list().data] == [MODEL]
