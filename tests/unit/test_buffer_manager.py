"""BufferManager with a fake provider and fake checks (unit tests may fake; asyncio.run inside)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from fastboot.buffer.health import CheckResult, Outcome
from fastboot.buffer.hosts import Host, HostSpec, HostState, StaticProvider
from fastboot.buffer.lp import BufferSizer, HostType, ScaleUpForecaster
from fastboot.buffer.manager import BufferConfig, BufferEvent, BufferManager
from fastboot.errors import NoHostAvailableError

IDLE, QUARANTINED = HostState.IDLE, HostState.QUARANTINED
FAST = {"reconcile_interval_s": 0.05, "provision_retry_s": 0.05}


class CloudProvider:
    """Unlimited hosts, each delivered `delay` seconds after it is asked for."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.asked = 0
        self.released: list[str] = []

    async def acquire(self, host_type: str) -> HostSpec | None:
        self.asked += 1
        number = self.asked
        await asyncio.sleep(self.delay)
        return HostSpec(f"{host_type}-{number}", f"http://127.0.0.1:{9000 + number}", "", host_type)

    async def release(self, spec: HostSpec) -> None:
        self.released.append(spec.name)

    def supply(self, host_type: str) -> int | None:
        return None


class FakeCheck:
    """Passes, except for hosts in `failing` (from their `fail_from`-th check on)."""

    def __init__(
        self,
        failing: dict[str, int] | None = None,
        delay: float = 0.0,
        probe: Callable[[], None] | None = None,
    ) -> None:
        self.failing = failing or {}
        self.delay = delay
        self.probe = probe
        self.calls: list[str] = []

    async def __call__(self, spec: HostSpec) -> CheckResult:
        self.calls.append(spec.name)
        if self.probe:
            self.probe()
        await asyncio.sleep(self.delay)
        nth = self.calls.count(spec.name)
        if spec.name in self.failing and nth >= self.failing[spec.name]:
            return CheckResult("fake", Outcome.FAIL, f"boom on check {nth}")
        return CheckResult("fake", Outcome.PASS, "ok")


def static(n: int) -> StaticProvider:
    return StaticProvider(HostSpec(f"h{i}", f"http://127.0.0.1:{8700 + i}") for i in range(n))


async def until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def test_fills_to_target_and_follows_new_targets() -> None:
    async def scenario() -> None:
        provider = CloudProvider()
        config = BufferConfig(targets={"cpu": 3}, **FAST)
        async with BufferManager(provider, FakeCheck(), FakeCheck(), config) as manager:
            await until(lambda: manager.count("cpu", IDLE) == 3)
            manager.set_targets({"cpu": 1})
            await until(lambda: manager.count("cpu", IDLE) == 1)
            assert len(provider.released) == 2
            assert manager.status()["cpu"]["target"] == 1
        assert len(provider.released) == 3  # stop() gives idle hosts back

    asyncio.run(scenario())


def test_burst_draws_down_the_buffer_then_refills() -> None:
    async def scenario() -> None:
        provider = CloudProvider(delay=0.5)
        config = BufferConfig(targets={"cpu": 2}, **FAST)
        async with BufferManager(provider, FakeCheck(), FakeCheck(), config) as manager:
            await until(lambda: manager.count("cpu", IDLE) == 2)
            assert provider.asked == 2

            async def timed() -> tuple[float, Host]:
                start = time.monotonic()
                host = await manager.acquire("cpu", timeout_s=5)
                return time.monotonic() - start, host

            results = sorted(await asyncio.gather(*(timed() for _ in range(5))))
            waits = [w for w, _ in results]
            assert all(w < 0.25 for w in waits[:2]), waits  # served from the buffer
            assert all(w >= 0.45 for w in waits[2:]), waits  # waited for on-demand hosts
            assert len({h.id for _, h in results}) == 5
            assert all(h.state is HostState.ASSIGNED for _, h in results)
            await until(lambda: manager.count("cpu", IDLE) == 2)  # refilled in the background
            assert provider.asked == 7

    asyncio.run(scenario())


def test_refill_is_requested_immediately_not_at_the_next_tick() -> None:
    async def scenario() -> None:
        provider = CloudProvider()
        config = BufferConfig(targets={"cpu": 1}, reconcile_interval_s=30.0)
        async with BufferManager(provider, FakeCheck(), FakeCheck(), config) as manager:
            await until(lambda: manager.count("cpu", IDLE) == 1)
            await manager.acquire("cpu")
            await until(lambda: provider.asked == 2, timeout=0.5)
            await until(lambda: manager.count("cpu", IDLE) == 1, timeout=0.5)

    asyncio.run(scenario())


def test_failing_host_is_quarantined_and_never_assigned() -> None:
    async def scenario() -> None:
        provider = static(4)
        short = FakeCheck(failing={"h1": 1})
        events: list[BufferEvent] = []
        config = BufferConfig(targets={"cpu": 2}, **FAST)
        manager = BufferManager(provider, short, FakeCheck(), config)
        manager.listeners.append(events.append)
        async with manager:
            await until(lambda: manager.count("cpu", IDLE) == 2)
            assigned = [await manager.acquire("cpu", timeout_s=1) for _ in range(3)]
            assert sorted(h.spec.name for h in assigned) == ["h0", "h2", "h3"]
            with pytest.raises(NoHostAvailableError, match="no healthy cpu host"):
                await manager.acquire("cpu", timeout_s=0.2)
            bad = manager.hosts[next(h.id for h in manager.hosts.values() if h.spec.name == "h1")]
            assert bad.state is QUARANTINED and "boom" in bad.reason
            assert short.calls.count("h1") == 1  # checked once, then left alone
            assert provider.supply("cpu") == 0  # never handed back, so never handed out again
        assert any(e.kind == "quarantined" and e.host == "h1" for e in events)
        assert any(e.kind == "empty" for e in events)
        assert bad.state is QUARANTINED  # stop() leaves quarantined hosts alone

    asyncio.run(scenario())


def test_assignment_runs_the_assign_tier_and_admission_the_short_one() -> None:
    async def scenario() -> None:
        short, assign = FakeCheck(), FakeCheck(failing={"h0": 1})
        config = BufferConfig(targets={"cpu": 2}, **FAST)
        manager = BufferManager(static(3), short, FakeCheck(), config, assign_check=assign)
        async with manager:
            await until(lambda: manager.count("cpu", IDLE) == 2)
            assert sorted(short.calls) == ["h0", "h1"] and not assign.calls
            host = await manager.acquire("cpu", timeout_s=1)
            # h0 failed the assign tier only: quarantined, and h1 handed out after its own
            assert host.spec.name == "h1" and assign.calls == ["h0", "h1"]
            assert manager.count("cpu", QUARANTINED) == 1
            await until(lambda: manager.count("cpu", IDLE) == 1)  # h2 admitted by short
            assert short.calls.count("h2") == 1 and "h2" not in assign.calls

    asyncio.run(scenario())


def test_host_failing_its_assignment_check_is_skipped() -> None:
    async def scenario() -> None:
        short = FakeCheck(failing={"h0": 2})  # passes the boot check, fails on assignment
        config = BufferConfig(targets={"cpu": 2}, **FAST)
        async with BufferManager(static(3), short, FakeCheck(), config) as manager:
            await until(lambda: manager.count("cpu", IDLE) == 2)
            host = await manager.acquire("cpu", timeout_s=1)
            assert host.spec.name == "h1"
            assert manager.count("cpu", QUARANTINED) == 1
            await until(lambda: manager.count("cpu", IDLE) == 1)  # h2 refilled; h0 is out

    asyncio.run(scenario())


def test_deep_checks_rotate_without_dropping_below_target() -> None:
    now = [0.0]
    seen_idle: list[int] = []

    async def scenario() -> None:
        config = BufferConfig(targets={"cpu": 2}, deep_check_interval_s=100.0, **FAST)
        deep = FakeCheck(delay=0.05, probe=lambda: seen_idle.append(manager.count("cpu", IDLE)))
        provider = static(3)
        manager = BufferManager(provider, FakeCheck(), deep, config, clock=lambda: now[0])
        async with manager:
            await until(lambda: manager.count("cpu", IDLE) == 2)
            assert deep.calls == []
            now[0] = 150.0  # h0 and h1 are due
            await until(lambda: sorted(deep.calls) == ["h0", "h1"])
            await until(lambda: manager.count("cpu", IDLE) == 2 and provider.supply("cpu") == 1)
        assert seen_idle and min(seen_idle) >= 2, seen_idle

    asyncio.run(scenario())


def test_deep_check_waits_when_no_spare_host_exists() -> None:
    now = [0.0]

    async def scenario() -> None:
        config = BufferConfig(targets={"cpu": 2}, deep_check_interval_s=100.0, **FAST)
        deep = FakeCheck()
        manager = BufferManager(static(2), FakeCheck(), deep, config, clock=lambda: now[0])
        async with manager:
            await until(lambda: manager.count("cpu", IDLE) == 2)
            now[0] = 150.0
            await asyncio.sleep(0.3)
            assert deep.calls == []  # checking one would leave 1 < target idle
            assert manager.count("cpu", IDLE) == 2

    asyncio.run(scenario())


def test_deep_check_failure_quarantines_and_refills() -> None:
    now = [0.0]

    async def scenario() -> None:
        config = BufferConfig(targets={"cpu": 1}, deep_check_interval_s=10.0, **FAST)
        deep = FakeCheck(failing={"h0": 1})
        manager = BufferManager(static(3), FakeCheck(), deep, config, clock=lambda: now[0])
        async with manager:
            await until(lambda: manager.count("cpu", IDLE) == 1)
            now[0] = 20.0
            await until(lambda: manager.count("cpu", QUARANTINED) == 1)
            await until(lambda: manager.count("cpu", IDLE) == 1)
            host = await manager.acquire("cpu", timeout_s=1)
            assert host.spec.name != "h0"

    asyncio.run(scenario())


def test_release_recycles_below_target_and_gives_back_above() -> None:
    async def scenario() -> None:
        provider = CloudProvider()
        config = BufferConfig(targets={"cpu": 1}, reconcile_interval_s=30.0)
        async with BufferManager(provider, FakeCheck(), FakeCheck(), config) as manager:
            await until(lambda: manager.count("cpu", IDLE) == 1)
            a = await manager.acquire("cpu")
            await until(lambda: manager.count("cpu", IDLE) == 1)
            await manager.release(a)
            assert a.state is HostState.RELEASED and provider.released == [a.spec.name]
            b = await manager.acquire("cpu")
            manager.set_targets({"cpu": 3})
            await manager.release(b)  # the buffer is short: b goes back into it
            await until(lambda: manager.count("cpu", IDLE) == 3)
            assert b.state is IDLE and [t.reason for t in b.history][-2:] == [
                "recycled",
                "short check passed",
            ]

    asyncio.run(scenario())


def test_boot_probe_quarantines_a_host_that_never_comes_up() -> None:
    async def scenario() -> None:
        probe = FakeCheck(failing={"cpu-1": 1})
        config = BufferConfig(targets={"cpu": 1}, boot_timeout_s=0.1, boot_poll_s=0.02, **FAST)
        manager = BufferManager(CloudProvider(), FakeCheck(), FakeCheck(), config, boot_probe=probe)
        async with manager:
            await until(lambda: manager.count("cpu", IDLE) == 1)
            dead = next(h for h in manager.hosts.values() if h.spec.name == "cpu-1")
            assert dead.state is QUARANTINED and "never came up" in dead.reason
            assert probe.calls.count("cpu-1") >= 3  # retried until the boot deadline

    asyncio.run(scenario())


def test_sizer_drives_the_manager_targets() -> None:
    async def scenario() -> None:
        provider = CloudProvider()
        config = BufferConfig(**FAST)
        host = HostType("cpu", 1.0, 100.0, 10, miss_cost_per_hour=5.0)
        sizer = BufferSizer((host,), {"tiny": "cpu"}, forecaster=ScaleUpForecaster(600, 600))
        async with BufferManager(provider, FakeCheck(), FakeCheck(), config) as manager:
            manager.listeners.append(lambda e: sizer.trigger() if e.kind == "empty" else None)
            task = asyncio.create_task(sizer.run(lambda p: manager.set_targets(p.targets), 3600))
            for _ in range(12):  # Poisson(2) per 100 s lead time -> 3 hosts (hand-solved LP)
                sizer.record_scaleup("tiny")
            await manager.acquire("cpu", timeout_s=2)  # empty buffer -> event -> re-solve
            await until(lambda: manager.count("cpu", IDLE) == 3)
            assert manager.targets == {"cpu": 3}
            task.cancel()

    asyncio.run(scenario())
