"""BufferedPlacement over fake agents (router/testing.py) and fake checks; asyncio.run inside."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from fastboot.buffer.health import CheckResult, Outcome
from fastboot.buffer.hosts import HostId, HostSpec, HostState, StaticProvider
from fastboot.buffer.manager import BufferConfig, BufferManager
from fastboot.buffer.placement import BufferedPlacement
from fastboot.errors import AgentError
from fastboot.router.testing import FakeAgent


async def passes(spec: HostSpec) -> CheckResult:
    return CheckResult("fake", Outcome.PASS, "ok")


async def with_fleet(
    agents: list[FakeAgent],
    body: Callable[[BufferManager, BufferedPlacement, StaticProvider], Awaitable[None]],
    target: int = 1,
) -> None:
    for agent in agents:
        await agent.start()
    provider = StaticProvider(HostSpec(f"h{i}", a.url, a.token) for i, a in enumerate(agents))
    config = BufferConfig(
        targets={"cpu": target}, reconcile_interval_s=0.05, provision_retry_s=0.05
    )
    manager = BufferManager(provider, passes, passes, config)
    try:
        async with aiohttp.ClientSession() as session, manager:
            await body(manager, BufferedPlacement(manager, session, acquire_timeout_s=2), provider)
    finally:
        for agent in agents:
            await agent.stop()


def engine(snapshot: str) -> str:
    return "http://127.0.0.1:9"


def test_a_host_with_free_slots_is_used_before_another_is_taken_and_freed_when_empty() -> None:
    agents = [FakeAgent(engine, slots=2), FakeAgent(engine, slots=2)]

    async def body(
        manager: BufferManager, placement: BufferedPlacement, provider: StaticProvider
    ) -> None:
        first = [await placement.place("snap") for _ in range(2)]
        assert {client.name for client, _ in first} == {"h0"}
        client, _ = await placement.place("snap")
        assert client.name == "h1"
        assert [a.name for a in placement.agents] == ["h0", "h1"]
        assert placement.agent("h0") is first[0][0]
        # h0 goes back only when its last replica is gone.
        await placement.replica_gone("h0", first[0][1].id)
        assert manager.hosts[HostId("h0")].state is HostState.ASSIGNED
        await placement.replica_gone("h0", first[1][1].id)
        assert placement.agent("h0") is None
        # The buffer (target 1) is empty and the provider has nothing left: h0 is recycled.
        h0 = manager.hosts[HostId("h0")]
        for _ in range(200):
            if h0.state is HostState.IDLE:
                break
            await asyncio.sleep(0.01)
        assert [t.after.value for t in h0.history][-3:] == ["draining", "checking", "idle"]
        assert manager.hosts[HostId("h1")].state is HostState.ASSIGNED

    asyncio.run(with_fleet(agents, body, target=1))


@pytest.mark.parametrize(("status", "blamed"), [(500, True), (404, False)])
def test_an_agent_failing_its_first_request_is_quarantined_only_when_it_is_the_hosts_fault(
    status: int, blamed: bool
) -> None:
    agents = [FakeAgent(engine, slots=1, refuse=[status]), FakeAgent(engine, slots=1)]

    async def body(
        manager: BufferManager, placement: BufferedPlacement, provider: StaticProvider
    ) -> None:
        with pytest.raises(AgentError) as caught:
            await placement.place("snap")
        assert caught.value.status == status
        assert placement.agent("h0") is None
        host = manager.hosts.get(HostId("h0"))
        if blamed:
            assert host is not None and host.state is HostState.QUARANTINED
            assert f"refused with {status}" in host.reason
        else:
            assert host is None or host.state is not HostState.QUARANTINED
        # The router retries: the next placement lands on a healthy host.
        client, info = await placement.place("snap")
        assert info.state == "restoring"
        assert client.name == "h1"

    asyncio.run(with_fleet(agents, body))


def test_no_host_in_time_is_an_agent_error_naming_the_buffer() -> None:
    agents = [FakeAgent(engine, slots=1)]

    async def body(
        manager: BufferManager, placement: BufferedPlacement, provider: StaticProvider
    ) -> None:
        await placement.place("snap")
        with pytest.raises(AgentError, match=r"\(buffer\).*no healthy cpu host within 2 s"):
            await placement.place("snap")

    asyncio.run(with_fleet(agents, body))
