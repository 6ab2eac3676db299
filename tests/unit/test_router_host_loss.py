"""Host loss as the router sees it, against fakes on 127.0.0.1: an agent and its engine that go
silent (a partition or a powered-off host: connections stay open, nothing comes back).

The router must find out by itself (its probes; requests alone would hang to the first-byte
timeout), send the requests the lost replica had not answered to another replica, end a stream
that was mid-answer there with a clean error, replace the replica elsewhere, and let the host
rejoin the buffer once its agent answers again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import yaml

from fastboot.buffer.agents import AgentEndpoint
from fastboot.buffer.hosts import HostId, HostSpec, HostState, StaticProvider
from fastboot.router.app import Router
from fastboot.router.config import BufferSection, ModelConfig, RouterConfig
from fastboot.router.testing import FakeAgent, FakeEngine, completion_body

MODEL = "m"
#: Fast probes so each test takes about a second; the defaults are 0.5 s and 2 s.
TIMEOUTS = replace(RouterConfig().timeouts, host_probe_s=0.05, host_lost_s=0.4, agent_s=2.0)


async def until(predicate: Callable[[], bool], what: str, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        await asyncio.sleep(0.01)


def run(main: Callable[[], object], deadline_s: float = 30.0) -> None:
    asyncio.run(asyncio.wait_for(main(), deadline_s))  # type: ignore[arg-type]


def host_losses(router: Router, agent: str) -> float:
    value = router.metrics.registry.get_sample_value("router_host_losses_total", {"agent": agent})
    return value or 0.0


async def post(port: int, body: bytes) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{port}/v1/completions", data=body) as response,
    ):
        return response.status, await response.read()


def test_silent_host_is_lost_its_unanswered_requests_go_elsewhere_and_it_is_replaced() -> None:
    async def main() -> None:
        engines = [FakeEngine(name="a"), FakeEngine(name="b")]
        for engine in engines:
            await engine.start()
        a = FakeAgent(lambda s: engines[0].url, slots=1, id_prefix="a")
        b = FakeAgent(lambda s: engines[1].url, slots=1, id_prefix="b")
        for agent in (a, b):
            await agent.start()
        config = RouterConfig(
            models=(ModelConfig(name=MODEL, snapshot="snap", min_replicas=2, max_replicas=2),),
            agents=(
                AgentEndpoint(a.url, token=a.token, name="A"),
                AgentEndpoint(b.url, token=b.token, name="B"),
            ),
            port=0,
            tick_s=0.05,
            timeouts=TIMEOUTS,
        )
        router = Router(config)
        try:
            await router.start()
            pool = router.pools[MODEL]
            await until(lambda: {r.id for r in pool.ready()} == {"a1", "b1"}, "two replicas")
            b.slots = 2  # room for the replacement
            a.silent = engines[0].silent = True
            started = time.monotonic()
            answers = await asyncio.gather(
                *(post(router.port, completion_body(MODEL)) for _ in range(6))
            )
            elapsed = time.monotonic() - started
            assert [status for status, _ in answers] == [200] * 6, answers
            assert {json.loads(body)["served_by"] for _, body in answers} == {"b"}
            # Some were dispatched to the silent replica and aborted there, then answered by b.
            assert engines[0].requests and engines[0].cancelled == len(engines[0].requests)
            assert elapsed < 3.0, f"lost host noticed only after {elapsed:.1f} s"
            assert host_losses(router, "A") == 1
            await until(lambda: {r.id for r in pool.ready()} == {"b1", "b2"}, "the replacement")
            assert a.deletes == []  # nothing was asked of the lost agent...
            assert "a1" not in pool.replicas  # ...and its replica left the books
        finally:
            a.silent = engines[0].silent = False
            await router.stop()
            for agent in (a, b):
                await agent.stop()
            for engine in engines:
                await engine.stop()

    run(main)


def test_stream_mid_answer_on_a_lost_host_ends_with_a_clean_error_event() -> None:
    async def main() -> None:
        engine = FakeEngine(chunk_delay_s=3600)  # first chunk, then nothing
        await engine.start()
        agent = FakeAgent(lambda s: engine.url, slots=1)
        await agent.start()
        config = RouterConfig(
            models=(ModelConfig(name=MODEL, snapshot="snap", min_replicas=1),),
            agents=(AgentEndpoint(agent.url, token=agent.token, name="A"),),
            port=0,
            timeouts=TIMEOUTS,
        )
        router = Router(config)
        try:
            await router.start()
            pool = router.pools[MODEL]
            await until(lambda: len(pool.ready()) == 1, "the replica")
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"http://127.0.0.1:{router.port}/v1/completions",
                    data=completion_body(MODEL, stream=True),
                ) as response,
            ):
                first = await response.content.readany()
                assert first == engine.chunks[0]
                agent.silent = True
                started = time.monotonic()
                rest = await response.read()
                elapsed = time.monotonic() - started
            event = json.loads(rest.decode().strip().removeprefix("data: "))
            assert event["error"]["code"] == "replica_failed"
            assert elapsed < 3.0, f"the stream hung {elapsed:.1f} s"
            assert host_losses(router, "A") == 1
        finally:
            agent.silent = False
            await router.stop()
            await agent.stop()
            await engine.stop()

    run(main)


def test_lost_host_leaves_the_buffer_the_buffer_refills_and_the_host_rejoins(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        engines = [FakeEngine(name=f"e{i}") for i in range(3)]
        agents = []
        for i, engine in enumerate(engines):
            await engine.start()
            agent = FakeAgent(lambda s, url=engine.url: url, slots=1, id_prefix=f"h{i}-")
            await agent.start()
            agents.append(agent)
        hosts = [
            {"name": f"h{i}", "address": a.url, "token": a.token} for i, a in enumerate(agents)
        ]
        (tmp_path / "hosts.yaml").write_text(yaml.safe_dump({"hosts": hosts}))
        config = RouterConfig(
            models=(ModelConfig(name=MODEL, snapshot="snap", min_replicas=1),),
            port=0,
            tick_s=0.05,
            timeouts=TIMEOUTS,
            buffer=BufferSection(str(tmp_path / "hosts.yaml"), "cpu", 1),
        )
        router = Router(config)

        def state(name: str) -> HostState | None:
            manager = router.controller._buffer
            assert manager is not None
            host = manager.hosts.get(HostId(name))
            return host.state if host else None

        try:
            await router.start()
            pool = router.pools[MODEL]
            await until(lambda: len(pool.ready()) == 1, "the replica")
            serving = pool.ready()[0].agent
            await until(
                lambda: sum(state(f"h{i}") is HostState.IDLE for i in range(3)) == 1, "buffer"
            )
            lost = int(serving[1])
            agents[lost].silent = engines[lost].silent = True
            await until(lambda: host_losses(router, serving) == 1, "the loss")
            # Replaced on the idle host (a restore through its agent), the buffer refilled from
            # the third, and the lost host is off the books, not quarantined for good.
            await until(
                lambda: len(pool.ready()) == 1 and pool.ready()[0].agent != serving,
                "the replacement",
            )
            await until(
                lambda: sum(state(f"h{i}") is HostState.IDLE for i in range(3)) == 1, "refill"
            )
            assert state(serving) is None
            # The host comes back (agent restarted, partition healed): the next refill takes it.
            agents[lost].silent = engines[lost].silent = False
            second = pool.ready()[0].agent
            agents[int(second[1])].silent = True
            await until(lambda: host_losses(router, second) == 1, "the second loss")
            await until(lambda: state(serving) is HostState.IDLE, "the first host's rejoin")
        finally:
            for agent, engine in zip(agents, engines, strict=True):
                agent.silent = engine.silent = False
            await router.stop()
            for agent in agents:
                await agent.stop()
            for engine in engines:
                await engine.stop()

    run(main)


def test_static_provider_hands_out_a_lost_host_only_once_its_agent_answers() -> None:
    async def main() -> None:
        agent = FakeAgent(lambda s: "http://127.0.0.1:9", slots=1)
        await agent.start()
        spec = HostSpec(name="h0", address=agent.url, token=agent.token)
        provider = StaticProvider([spec])
        try:
            assert await provider.acquire("cpu") == spec
            await provider.lost(spec)
            agent.silent = True
            assert provider.supply("cpu") == 0
            assert await provider.acquire("cpu") is None  # silent: not handed out
            agent.silent = False
            assert await provider.acquire("cpu") == spec  # answers again: rejoins
            assert await provider.acquire("cpu") is None  # in use
        finally:
            agent.silent = False
            await agent.stop()

    run(main)
