"""The BufferManager: keeps `target` healthy idle hosts per host type, hands them out on demand,
refills in the background, deep-checks idle hosts on a cadence, and quarantines failures.

It runs on one asyncio loop and changes host states only between awaits, so two callers never
get the same host. Everything slow (provider delivery, health checks) runs in tasks it owns and
cancels on `stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from fastboot.buffer.health import CheckResult, HealthCheck, Outcome
from fastboot.buffer.hosts import Host, HostId, HostSpec, HostState, Provider
from fastboot.errors import NoHostAvailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BufferConfig:
    """How the manager keeps its buffer. Defaults and their sources: docs/buffer.md."""

    targets: Mapping[str, int] = field(default_factory=dict)  #: idle hosts to keep per host type
    deep_check_interval_s: float = 24 * 3600.0  #: deep check every idle host this often
    reconcile_interval_s: float = 5.0  #: re-examine the buffer at least this often
    provision_retry_s: float = 30.0  #: wait after the provider had no host to give
    max_provisioning: int = 16  #: most concurrent provider requests per host type
    surge: int = 1  #: extra hosts allowed while deep-checking, so idle never drops below target
    recycle: bool = True  #: a released host goes back to the buffer (after a check) if needed
    boot_timeout_s: float = 600.0  #: a delivered host must answer its boot probe within this
    boot_poll_s: float = 2.0  #: how often the boot probe is retried
    acquire_timeout_s: float = 900.0  #: default wait for a host in acquire()


@dataclass(frozen=True)
class BufferEvent:
    """Something listeners may act on (metrics, the LP sizer's triggers)."""

    kind: str  #: idle | assigned | empty | quarantined | released | lost | no-supply
    host_type: str  #: the host type concerned
    host: str = ""  #: host name, when one host is concerned
    detail: str = ""  #: check result or reason


class BufferManager:
    """Healthy idle hosts, kept at a target per host type.

    - `acquire(host_type)`: the oldest idle host, passed by `assign_check` (the light tier; the
      short check when none is given), as ASSIGNED; triggers a refill at once. Waits (up to a
      timeout) when the buffer is empty, and counts the wait as demand, so a burst larger than
      the buffer provisions hosts on demand.
    - `release(host)`: a host whose replicas are stopped; back to the buffer after a short check
      when the buffer is below target, otherwise back to the provider.
    - Idle hosts get the deep check every `deep_check_interval_s`, one at a time per type, only
      while another idle host covers the target (a surge host is provisioned for that).
    - A failed check quarantines the host with the reason; quarantined hosts are never assigned
      and never given back to the provider (so a static provider never hands them out again).
    """

    def __init__(
        self,
        provider: Provider,
        short_check: HealthCheck,
        deep_check: HealthCheck,
        config: BufferConfig | None = None,
        *,
        assign_check: HealthCheck | None = None,
        boot_probe: HealthCheck | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.short_check = short_check
        self.assign_check = short_check if assign_check is None else assign_check
        self.deep_check = deep_check
        self.config = config or BufferConfig()
        self.boot_probe = boot_probe
        self.clock = clock
        self.hosts: dict[HostId, Host] = {}
        self.listeners: list[Callable[[BufferEvent], None]] = []
        self._targets: dict[str, int] = dict(self.config.targets)
        self._waiting: dict[str, int] = {}
        self._requested: dict[str, int] = {}  # provider requests not delivered yet
        self._no_supply_until: dict[str, float] = {}
        self._deep_due: dict[HostId, float] = {}
        self._deep_running: set[HostId] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    # --- lifecycle of the manager -------------------------------------------------------------

    async def start(self) -> None:
        """Start filling the buffer."""
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="buffer-reconcile")

    async def stop(self) -> None:
        """Cancel provisioning and checks; give idle and checking hosts back to the provider.
        Assigned and quarantined hosts are left as they are."""
        tasks = [t for t in [self._loop_task, *self._tasks] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = None
        for host in list(self.hosts.values()):
            if host.state in (HostState.IDLE, HostState.CHECKING, HostState.PROVISIONING):
                await self._give_back(host, "buffer stopped")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- the API the router uses ---------------------------------------------------------------

    @property
    def targets(self) -> dict[str, int]:
        """Idle hosts to keep per host type."""
        return dict(self._targets)

    def set_targets(self, targets: Mapping[str, int]) -> None:
        """New targets (e.g. `BufferPlan.targets` from the LP); types not named keep theirs."""
        self._targets.update({name: max(0, int(n)) for name, n in targets.items()})
        self._wake.set()

    def count(self, host_type: str, state: HostState) -> int:
        """Hosts of `host_type` in `state`."""
        return sum(1 for h in self.hosts.values() if h.host_type == host_type and h.state is state)

    def status(self) -> dict[str, dict[str, int]]:
        """Per host type: the target, hosts per state, and requests not yet delivered."""
        types = set(self._targets) | {h.host_type for h in self.hosts.values()}
        out: dict[str, dict[str, int]] = {}
        for name in sorted(types):
            row = {state.value: self.count(name, state) for state in HostState}
            row["target"] = self._targets.get(name, 0)
            row["requested"] = self._requested.get(name, 0)
            out[name] = row
        return out

    async def acquire(self, host_type: str, timeout_s: float | None = None) -> Host:
        """A healthy host of `host_type`, ASSIGNED to the caller.

        Raises NoHostAvailableError when none passed its check within the timeout.
        """
        timeout = self.config.acquire_timeout_s if timeout_s is None else timeout_s
        deadline = self.clock() + timeout
        while True:
            host = self._oldest_idle(host_type)
            if host is None:
                self._emit(BufferEvent("empty", host_type))
                if not await self._wait_for_idle(host_type, deadline - self.clock()):
                    raise NoHostAvailableError(
                        f"no healthy {host_type} host within {timeout:g} s "
                        f"({self._describe(host_type)}); add supply or raise the buffer target"
                    )
                continue
            started = self.clock()
            host.move(HostState.ASSIGNED, "taken")
            self._wake.set()  # refill now, while the assignment check runs
            result = await self._check(self.assign_check, host)
            if host.state is not HostState.ASSIGNED:
                continue  # quarantined from outside while it was being checked
            if not result.ok:
                self._quarantine(host, result)
                continue
            log.info(
                "host %s (%s) assigned from the buffer; check %.2f s",
                host.spec.name,
                host_type,
                self.clock() - started,
            )
            self._emit(BufferEvent("assigned", host_type, host.spec.name, result.detail))
            return host

    async def _wait_for_idle(self, host_type: str, timeout: float) -> bool:
        """Wait for any change while counted as demand (so hosts are provisioned on demand)."""
        if timeout <= 0:
            return False
        self._waiting[host_type] = self._waiting.get(host_type, 0) + 1
        self._wake.set()
        try:
            return await self._wait_change(timeout)
        finally:
            self._waiting[host_type] -= 1

    async def release(self, host: Host, reason: str = "scale-down") -> None:
        """Take back an assigned host whose replicas are stopped."""
        host.move(HostState.DRAINING, reason)
        needed = self._want(host.host_type) - self._coming(host.host_type)
        if self.config.recycle and needed > 0:
            host.move(HostState.CHECKING, "recycled")
            self._spawn(self._admit(host), f"recycle-{host.spec.name}")
        else:
            await self._give_back(host, reason)

    def quarantine(self, host: Host, reason: str) -> None:
        """Take a host out of service (a passive signal: Xid, a crashed replica)."""
        self._quarantine(host, CheckResult("manual", Outcome.FAIL, reason))

    async def lost(self, host: Host, reason: str) -> None:
        """An assigned host stopped answering (crashed, powered off, partitioned). It leaves the
        books at once, not through a recycle check that would wait on it and then quarantine it
        for good: the provider gets it back marked lost, to hand out again only once its agent
        answers (StaticProvider) or to replace it (a cloud provider releases it)."""
        host.move(HostState.DRAINING, f"lost: {reason}")
        host.move(HostState.RELEASED, f"lost: {reason}")
        self._emit(BufferEvent("lost", host.host_type, host.spec.name, reason))
        mark_lost = getattr(self.provider, "lost", None)
        if mark_lost is None:
            await self._provider_release(host)
        else:
            self._deep_due.pop(host.id, None)
            try:
                await mark_lost(host.spec)
            except Exception as exc:
                log.warning("provider failed to take back lost host %s: %s", host.spec.name, exc)
            self.hosts.pop(host.id, None)
            self._notify()
        self._wake.set()  # the buffer may be short now: refill

    async def forget(self, host: Host) -> None:
        """Give a quarantined host back to the provider (an operator repaired or replaced it)."""
        await self._give_back(host, "released from quarantine")

    # --- internals ------------------------------------------------------------------------------

    def _emit(self, event: BufferEvent) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                log.exception("buffer listener failed on %s", event)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float) -> bool:
        changed = self._changed
        try:
            async with asyncio.timeout(timeout):
                await changed.wait()
        except TimeoutError:
            return False
        return True

    def _describe(self, host_type: str) -> str:
        row = self.status().get(host_type, {})
        busy = {k: v for k, v in row.items() if v}
        return ", ".join(f"{k} {v}" for k, v in busy.items()) or "no hosts"

    def _oldest_idle(self, host_type: str) -> Host | None:
        idle = [
            h for h in self.hosts.values() if h.host_type == host_type and h.state is HostState.IDLE
        ]
        return min(idle, key=lambda h: h.since) if idle else None

    def _want(self, host_type: str) -> int:
        """Idle hosts wanted: target + callers waiting + a surge host while deep checks are due."""
        extra = 0
        if self.config.surge and (self._due(host_type) or self._deep_count(host_type)):
            extra = self.config.surge
        return self._targets.get(host_type, 0) + self._waiting.get(host_type, 0) + extra

    def _coming(self, host_type: str) -> int:
        """Idle hosts now or soon: idle, checking, delivered-but-booting, and requested."""
        soon = (HostState.IDLE, HostState.CHECKING, HostState.PROVISIONING)
        here = sum(1 for h in self.hosts.values() if h.host_type == host_type and h.state in soon)
        return here + self._requested.get(host_type, 0)

    def _due(self, host_type: str) -> list[Host]:
        now = self.clock()
        return [
            h
            for h in self.hosts.values()
            if h.host_type == host_type
            and h.state is HostState.IDLE
            and self._deep_due.get(h.id, now + 1) <= now
        ]

    def _deep_count(self, host_type: str) -> int:
        return sum(1 for i in self._deep_running if self.hosts[i].host_type == host_type)

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                self._reconcile()
            except Exception:
                log.exception("buffer reconcile failed; retrying")
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that lands as
            # its timeout fires, and stop() then waits on this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.reconcile_interval_s):
                    await self._wake.wait()

    def _reconcile(self) -> None:
        types = set(self._targets) | set(self._waiting) | {h.host_type for h in self.hosts.values()}
        now = self.clock()
        for host_type in sorted(types):
            want = self._want(host_type)
            deficit = want - self._coming(host_type)
            room = self.config.max_provisioning - self._requested.get(host_type, 0)
            if deficit > 0 and room > 0 and now >= self._no_supply_until.get(host_type, 0.0):
                for _ in range(min(deficit, room)):
                    self._requested[host_type] = self._requested.get(host_type, 0) + 1
                    self._spawn(self._provision(host_type), f"provision-{host_type}")
            # Deep checks, one host at a time, only while the rest still covers the target.
            floor = self._targets.get(host_type, 0) + self._waiting.get(host_type, 0)
            for host in self._due(host_type):
                if self._deep_count(host_type) >= max(1, self.config.surge):
                    break
                if self.count(host_type, HostState.IDLE) <= floor:
                    break
                host.move(HostState.CHECKING, "deep check")
                self._deep_running.add(host.id)
                self._spawn(self._deep(host), f"deep-{host.spec.name}")
            # Surplus idle hosts go back (newest first), but never while deep checks are pending.
            surplus = self.count(host_type, HostState.IDLE) - want
            if surplus > 0 and not self._due(host_type) and not self._deep_count(host_type):
                idle = [
                    h
                    for h in self.hosts.values()
                    if h.host_type == host_type and h.state is HostState.IDLE
                ]
                for host in sorted(idle, key=lambda h: h.since, reverse=True)[:surplus]:
                    host.move(HostState.RELEASED, "surplus")
                    self._spawn(self._provider_release(host), f"release-{host.spec.name}")

    async def _provision(self, host_type: str) -> None:
        started = self.clock()
        try:
            spec = await self.provider.acquire(host_type)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("provider failed to deliver a %s host: %s", host_type, exc)
            spec = None
        finally:
            self._requested[host_type] -= 1
        if spec is None:
            self._no_supply_until[host_type] = self.clock() + self.config.provision_retry_s
            self._emit(BufferEvent("no-supply", host_type))
            log.info(
                "no %s host to be had; retrying in %g s", host_type, self.config.provision_retry_s
            )
            self._notify()
            return
        host = Host(spec)
        self.hosts[host.id] = host
        log.info("host %s (%s) delivered in %.2f s", spec.name, host_type, self.clock() - started)
        if self.boot_probe is not None and not await self._wait_booted(host):
            return
        host.move(HostState.CHECKING, "boot check")
        await self._admit(host)

    async def _wait_booted(self, host: Host) -> bool:
        assert self.boot_probe is not None
        deadline = self.clock() + self.config.boot_timeout_s
        while True:
            result = await self.boot_probe(host.spec)
            if result.ok:
                return True
            if self.clock() >= deadline:
                self._quarantine(
                    host,
                    CheckResult(
                        result.check,
                        Outcome.FAIL,
                        f"never came up in {self.config.boot_timeout_s:g} s: {result.detail}",
                    ),
                )
                return False
            await asyncio.sleep(self.config.boot_poll_s)

    async def _admit(self, host: Host) -> None:
        """Short-check a CHECKING host into the buffer, or quarantine it."""
        result = await self._check(self.short_check, host)
        if host.state is not HostState.CHECKING:
            return
        if not result.ok:
            self._quarantine(host, result)
            return
        host.move(HostState.IDLE, "short check passed")
        self._deep_due[host.id] = self.clock() + self.config.deep_check_interval_s
        log.info(
            "host %s (%s) in the buffer; check %.2f s",
            host.spec.name,
            host.host_type,
            result.duration_s,
        )
        self._emit(BufferEvent("idle", host.host_type, host.spec.name, result.detail))
        self._notify()
        self._wake.set()

    async def _deep(self, host: Host) -> None:
        try:
            result = await self._check(self.deep_check, host)
        finally:
            self._deep_running.discard(host.id)
        if host.state is not HostState.CHECKING:
            return
        if not result.ok:
            self._quarantine(host, result)
        else:
            host.move(HostState.IDLE, "deep check passed")
            self._deep_due[host.id] = self.clock() + self.config.deep_check_interval_s
            log.info("host %s deep check passed in %.1f s", host.spec.name, result.duration_s)
            self._notify()
        self._wake.set()

    async def _check(self, check: HealthCheck, host: Host) -> CheckResult:
        try:
            result = await check(host.spec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            result = CheckResult("check", Outcome.FAIL, f"check crashed: {exc!r}")
        if result.outcome is Outcome.UNAVAILABLE:
            log.warning("host %s: %s", host.spec.name, result.detail)
        return result

    def _quarantine(self, host: Host, result: CheckResult) -> None:
        reason = f"{result.check}: {result.detail}" if result.check else result.detail
        host.move(HostState.QUARANTINED, reason)
        self._deep_due.pop(host.id, None)
        log.warning("host %s (%s) quarantined: %s", host.spec.name, host.host_type, reason)
        # A provider that can fence the host off (Kubernetes: taint and cordon the node) does.
        if (fence := getattr(self.provider, "quarantine", None)) is not None:
            self._spawn(self._provider_quarantine(fence, host, reason), f"fence-{host.spec.name}")
        self._emit(BufferEvent("quarantined", host.host_type, host.spec.name, reason))
        self._notify()
        self._wake.set()

    async def _provider_quarantine(
        self, fence: Callable[[HostSpec, str], Awaitable[None]], host: Host, reason: str
    ) -> None:
        try:
            await fence(host.spec, reason)
        except Exception as exc:
            log.warning("provider failed to quarantine host %s: %s", host.spec.name, exc)

    async def _give_back(self, host: Host, reason: str) -> None:
        host.move(HostState.RELEASED, reason)
        await self._provider_release(host)

    async def _provider_release(self, host: Host) -> None:
        self._deep_due.pop(host.id, None)
        try:
            await self.provider.release(host.spec)
        except Exception as exc:
            log.warning("provider failed to take back host %s: %s", host.spec.name, exc)
        self.hosts.pop(host.id, None)
        self._emit(BufferEvent("released", host.host_type, host.spec.name, host.reason))
        self._notify()
