"""The router's control plane: placing, watching, replacing and retiring replicas.

- Placement starts the moment a pool asks (first request at zero, hard caps exceeded) and on each
  autoscaler tick; one task per wanted replica places it (retrying other agents, then backing
  off while it is still wanted), long-polls the agent until it is ready, then opens it to traffic.
- A replica that crashes mid-request, or that its agent reports failed/dead/gone, is taken out of
  routing at once, deleted through its agent and replaced if still wanted.
- On start, replicas the agents already run for a configured snapshot are adopted (a restarted
  router does not restore everything again).
- Every agent that runs routed replicas is probed each `host_probe_s`; one silent for
  `host_lost_s` has lost its host (crash, power, partition): its replicas leave routing at once,
  their unanswered requests are aborted (the proxy sends those that got no byte yet to another
  replica), they are replaced elsewhere (restores, through the placement), and the host leaves
  the buffer marked lost (it may rejoin once its agent answers again). Requests alone cannot
  tell: on a partition the kernel never resets the connections, so they would hang until the
  first-byte timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp

from fastboot.buffer.agents import (
    DEAD,
    FAILED,
    READY,
    RESTORING,
    STOPPED,
    AgentClient,
    ReplicaInfo,
)
from fastboot.buffer.health import assign_check, deep_check, short_check
from fastboot.buffer.hosts import StaticProvider
from fastboot.buffer.kubernetes import KubernetesProvider
from fastboot.buffer.manager import BufferConfig, BufferManager
from fastboot.buffer.placement import BufferedPlacement
from fastboot.errors import AgentError
from fastboot.router.config import BufferSection, RouterConfig
from fastboot.router.metrics import RouterMetrics
from fastboot.router.placement import Placement
from fastboot.router.pool import ModelPool
from fastboot.router.upstream import BOOTING, DRAINING, GONE, UNHEALTHY, RoutedReplica, Upstream
from fastboot.router.upstream import READY as R_READY

logger = logging.getLogger(__name__)

#: Seconds of each ready long poll (the agent answers sooner when the replica is ready).
LONG_POLL_S = 30.0
#: Backoff between placement attempts while no agent can take a replica.
BACKOFF_S = (0.5, 1.0, 2.0, 5.0)


class Controller:
    """Owns every pool's replicas; the HTTP layer only acquires and releases slots."""

    def __init__(
        self,
        config: RouterConfig,
        pools: dict[str, ModelPool],
        metrics: RouterMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.pools = pools
        self.metrics = metrics
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None
        self.placement: Placement | BufferedPlacement = Placement([])
        self._buffer: BufferManager | None = None
        self._buffered: BufferedPlacement | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        #: Agent name -> when it last answered (anything): host-loss detection.
        self._heard: dict[str, float] = {}
        self._probing: set[str] = set()
        for pool in pools.values():
            pool.scale_up = self._scale_up
            pool.retire = self._retire

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        if self.config.buffer is not None:
            self.placement = await self._buffered_placement(self.config.buffer, self._session)
        else:
            agents = [
                AgentClient(a, self._session, self.config.timeouts.agent_s)
                for a in self.config.agents
            ]
            self.placement = Placement(agents, self.config.timeouts.host_lost_s)
        self.placement.on_error.append(
            lambda agent, reason: self.metrics.placement_errors.labels(agent, reason).inc()
        )
        await self._adopt()
        for pool in self.pools.values():
            pool.target = max(pool.target, pool.config.floor)
            if pool.current() < pool.target:
                self._scale_up(pool, pool.target - pool.current())
        self._spawn(self._tick_loop())

    async def _buffered_placement(
        self, section: BufferSection, session: aiohttp.ClientSession
    ) -> BufferedPlacement:
        """Agents come from a buffer of checked idle hosts; a host taken is refilled at once.
        Hosts come from the section's provider: a static list, or Kubernetes balloon pods."""
        provider: StaticProvider | KubernetesProvider
        if section.provider == "kubernetes":
            provider = KubernetesProvider(section.kubernetes)
        else:
            provider = StaticProvider.from_file(Path(section.hosts_file))
        self._buffer = BufferManager(
            provider,
            short_check(),
            deep_check(),
            BufferConfig(targets={section.host_type: section.target}),
            assign_check=assign_check(),
        )
        await self._buffer.start()
        self._buffered = BufferedPlacement(
            self._buffer, session, section.host_type, self.config.timeouts.agent_s
        )
        return self._buffered

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for pool in self.pools.values():
            for replica in list(pool.replicas.values()):
                if self.config.release_on_exit:
                    await self._delete(replica)
                if replica.upstream is not None:
                    await replica.upstream.close()
        if self._buffer is not None:
            await self._buffer.stop()
        if self._session is not None:
            await self._session.close()

    def buffer_hosts(self) -> list[dict[str, str]] | None:
        """The buffer's hosts (name, type, state, reason), or None without a buffer."""
        if self._buffer is None:
            return None
        return [
            {
                "name": h.spec.name,
                "host_type": h.host_type,
                "state": h.state.value,
                "reason": h.reason,
            }
            for h in sorted(self._buffer.hosts.values(), key=lambda h: h.spec.name)
        ]

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self._stopping:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- adoption --------------------------------------------------------------------------

    async def _adopt(self) -> None:
        async def listing(agent: AgentClient) -> list[ReplicaInfo]:
            try:
                return await agent.list_replicas()
            except AgentError as exc:
                logger.warning("cannot list replicas to adopt: %s", exc)
                return []

        listings = await asyncio.gather(*(listing(a) for a in self.placement.agents))
        for agent, infos in zip(self.placement.agents, listings, strict=True):
            for info in infos:
                pool = self._pool_for_snapshot(info.snapshot)
                if pool is None or info.state not in (READY, RESTORING):
                    continue
                replica = self._add(pool, agent, info)
                # Kept at least one scale-down delay, like a replica this router placed.
                pool.autoscaler.want(self.clock(), len(pool.live()))
                logger.info("adopted %s replica %s on %s", pool.name, info.id, agent.name)
                if info.state == READY:
                    self._open(pool, replica)
                else:
                    self._spawn(self._watch(pool, agent, replica, self.clock()))
        self._spawn(self._probe_loop())

    def _pool_for_snapshot(self, snapshot: str) -> ModelPool | None:
        if not snapshot:
            return None
        for pool in self.pools.values():
            for wanted in pool.config.candidates:
                if snapshot.startswith(wanted) or wanted.startswith(snapshot):
                    return pool
        return None

    # --- placement -------------------------------------------------------------------------

    def _scale_up(self, pool: ModelPool, count: int) -> None:
        for _ in range(count):
            pool.pending += 1
            self._spawn(self._place(pool))

    async def _place(self, pool: ModelPool) -> None:
        """Place one replica for `pool`, retrying while it is still wanted.

        After two or more boots of this model failed in a row (e.g. an agent that cannot
        restore the snapshot, or is still cleaning up a dead replica's namespace), the next
        placement first waits out a backoff, so a broken restore is not retried in a tight loop.
        """
        attempt = 0
        placed = False
        try:
            if (failures := pool.boot_failures) > 1:
                delay = BACKOFF_S[min(failures - 2, len(BACKOFF_S) - 1)]
                logger.info(
                    "%d boots of %s failed in a row; placing again in %.1f s",
                    failures,
                    pool.name,
                    delay,
                )
                await asyncio.sleep(delay)
                if pool.current() > pool.target:
                    return
            while True:
                started = self.clock()
                try:
                    agent, info = await self.placement.place(pool.config.candidates)
                except AgentError as exc:
                    pool.last_error = f"no replica of {pool.name} could be placed: {exc}"
                    if pool.current() > pool.target:
                        return
                    delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                    attempt += 1
                    logger.warning("%s; retrying in %.1f s", pool.last_error, delay)
                    await asyncio.sleep(delay)
                    continue
                self.metrics.boot.labels(pool.name, "place").observe(self.clock() - started)
                pool.pending -= 1
                placed = True
                replica = self._add(pool, agent, info)
                logger.info(
                    "placing %s replica %s on %s (snapshot %s)",
                    pool.name,
                    info.id,
                    agent.name,
                    info.snapshot,
                )
                break
        finally:
            # Every way out without a replica (given up, cancelled) ends the pending placement.
            if not placed:
                pool.pending -= 1
        await self._watch(pool, agent, replica, started)

    async def _watch(
        self, pool: ModelPool, agent: AgentClient, replica: RoutedReplica, started: float
    ) -> None:
        """Long-poll the agent until `replica` is ready (open it) or failed (replace it)."""
        deadline = started + pool.config.boot_timeout_s
        info: ReplicaInfo | None = None
        while replica.state == BOOTING:
            remaining = deadline - self.clock()
            if remaining <= 0:
                pool.boot_failures += 1
                self._fail(pool, replica, "boot_timeout", "not ready within boot_timeout_s")
                return
            try:
                info = await agent.wait_ready(replica.id, min(LONG_POLL_S, remaining))
            except AgentError as exc:
                if exc.status == 404:
                    pool.boot_failures += 1
                    self._fail(pool, replica, "dead", "its agent no longer knows it")
                    return
                logger.warning("waiting for replica %s: %s", replica.id, exc)
                await asyncio.sleep(min(1.0, max(0.0, deadline - self.clock())))
                continue
            if info.state == READY:
                break
            if info.state in (FAILED, DEAD, STOPPED):
                pool.boot_failures += 1
                self._fail(pool, replica, info.state, info.error or info.state)
                return
        if replica.state != BOOTING or info is None:
            return
        pool.boot_failures = 0
        replica.address = info.address or replica.address
        replica.served_model = pool.config.served_model_name or info.model or pool.name
        boot = self.metrics.boot
        for phase in ("restore", "ready"):
            if (value := info.timings.get(f"{phase}_s")) is not None:
                boot.labels(pool.name, phase).observe(value)
        total = self.clock() - started
        boot.labels(pool.name, "total").observe(total)
        logger.info("%s replica %s ready in %.2f s", pool.name, replica.id, total)
        self._open(pool, replica)

    def _add(self, pool: ModelPool, agent: AgentClient, info: ReplicaInfo) -> RoutedReplica:
        # It just answered (placed or listed the replica): the silence clock starts now.
        self._heard[agent.name] = self.clock()
        replica = RoutedReplica(
            info.id,
            pool.name,
            agent.name,
            info.address,
            pool.config.served_model_name or info.model or pool.name,
            pool.config.concurrency,
        )
        pool.replicas[replica.id] = replica
        self._count_states(pool)
        return replica

    def _open(self, pool: ModelPool, replica: RoutedReplica) -> None:
        replica.upstream = Upstream(replica.address, self.config.timeouts)
        replica.state = R_READY
        pool.last_error = None
        self._count_states(pool)
        pool.dispatch()

    # --- failures and retirement -----------------------------------------------------------

    def replica_failed(self, pool: ModelPool, replica: RoutedReplica, reason: str) -> None:
        """A request saw `replica` crash: stop routing to it, delete and replace it."""
        if replica.state in (UNHEALTHY, GONE):
            return
        self._fail(pool, replica, "crashed", reason)

    def _fail(self, pool: ModelPool, replica: RoutedReplica, kind: str, reason: str) -> None:
        logger.warning("%s replica %s %s: %s; replacing it", pool.name, replica.id, kind, reason)
        self.metrics.replica_failures.labels(pool.name, kind).inc()
        pool.last_error = f"replica {replica.id} of {pool.name} {kind}: {reason}"
        replica.state = UNHEALTHY
        self._count_states(pool)
        self._spawn(self._remove(pool, replica))
        if pool.queue or pool.current() < pool.target:
            pool.need_capacity()

    def _retire(self, pool: ModelPool, replica: RoutedReplica) -> None:
        """A draining replica has finished its requests, or a removed one its last request."""
        if replica.state == GONE:
            if replica.upstream is not None:
                self._spawn(replica.upstream.close())
        else:
            self._spawn(self._remove(pool, replica))

    async def _remove(self, pool: ModelPool, replica: RoutedReplica) -> None:
        if not replica.lost:  # a lost host's agent cannot answer; its rejoin cleans it
            with contextlib.suppress(AgentError):
                await self._delete(replica)
        replica.state = GONE
        pool.replicas.pop(replica.id, None)
        with contextlib.suppress(KeyError):
            self.metrics.inflight.remove(pool.name, replica.id)
        self._count_states(pool)
        if replica.upstream is not None and replica.inflight == 0:
            await replica.upstream.close()

    async def _delete(self, replica: RoutedReplica) -> None:
        agent = self.placement.agent(replica.agent)
        if agent is None:
            return
        try:
            await agent.delete_replica(replica.id)
            logger.info("deleted %s replica %s on %s", replica.model, replica.id, agent.name)
        except AgentError as exc:
            if exc.status != 404:
                logger.warning("could not delete replica %s: %s", replica.id, exc)
                raise
        finally:
            # Also when the agent is unreachable: the buffer's recycle check then finds out.
            if self._buffered is not None:
                await self._buffered.replica_gone(replica.agent, replica.id)

    def _count_states(self, pool: ModelPool) -> None:
        counts = dict.fromkeys((BOOTING, R_READY, DRAINING, UNHEALTHY), 0)
        for replica in pool.replicas.values():
            if replica.state in counts:
                counts[replica.state] += 1
        for state, count in counts.items():
            self.metrics.replicas.labels(pool.name, state).set(count)

    # --- the tick --------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_s)
            try:
                await self.tick()
            except Exception:
                logger.exception("router tick failed")

    async def tick(self) -> None:
        """One autoscaler and health round for every model."""
        await self._check_health()
        now = self.clock()
        for pool in self.pools.values():
            for replica in pool.replicas.values():
                self.metrics.inflight.labels(pool.name, replica.id).set(replica.inflight)
            pool.autoscaler.observe(now, pool.demand_average())
            decision = pool.autoscaler.decide(now, len(pool.ready()), pool.current())
            pool.target = decision.desired
            current = pool.current()
            if decision.desired > current:
                logger.info(
                    "scaling %s up %d -> %d (demand %.1f, panic %s)",
                    pool.name,
                    current,
                    decision.desired,
                    decision.stable_demand,
                    decision.panic,
                )
                self._scale_up(pool, decision.desired - current)
            elif decision.desired < current:
                self._scale_down(pool, current - decision.desired)

    def _scale_down(self, pool: ModelPool, count: int) -> None:
        # Booting replicas first (they serve nobody yet), then the least busy ready ones.
        live = sorted(pool.live(), key=lambda r: (r.state != BOOTING, r.inflight, -r.created))
        for replica in live[:count]:
            logger.info("scaling %s down: draining replica %s", pool.name, replica.id)
            replica.state = DRAINING
            if replica.inflight == 0:
                self._retire(pool, replica)
        self._count_states(pool)

    async def _check_health(self) -> None:
        """Replicas their agent reports failed, dead, stopped or unknown are replaced."""
        ours: dict[str, list[tuple[ModelPool, RoutedReplica]]] = {}
        for pool in self.pools.values():
            for replica in pool.replicas.values():
                if replica.state in (R_READY, DRAINING):
                    ours.setdefault(replica.agent, []).append((pool, replica))
        agents = [a for name in ours if (a := self.placement.agent(name)) is not None]
        listings = await asyncio.gather(*(self._listing(agent) for agent in agents))
        for agent, listing in zip(agents, listings, strict=True):
            if listing is None:
                continue
            listed = {info.id: info for info in listing}
            for pool, replica in ours[agent.name]:
                if replica.state not in (R_READY, DRAINING):
                    continue  # failed meanwhile (its host lost, a crash seen by a request)
                info = listed.get(replica.id)
                if info is None:
                    self._fail(pool, replica, "dead", "its agent no longer lists it")
                elif info.state in (FAILED, DEAD, STOPPED):
                    self._fail(pool, replica, info.state, info.error or info.state)

    async def _listing(self, agent: AgentClient) -> list[ReplicaInfo] | None:
        """The agent's replicas, or None when it does not answer in time. An unreachable agent
        does not prove its replicas dead here: the host probes decide that (host_lost_s), and
        a silent agent must not hold up the autoscaler's tick."""
        try:
            async with asyncio.timeout(self.config.timeouts.host_lost_s):
                return await agent.list_replicas()
        except (AgentError, TimeoutError) as exc:
            logger.debug("health: %s: %s", agent.name, exc)
            return None

    # --- host loss -------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.timeouts.host_probe_s)
            try:
                self.probe_hosts()
            except Exception:
                logger.exception("host probe round failed")

    def probe_hosts(self) -> None:
        """One round: probe each agent that runs routed replicas (one probe in flight per
        agent), and declare lost those silent for longer than host_lost_s."""
        busy = {
            replica.agent
            for pool in self.pools.values()
            for replica in pool.replicas.values()
            if replica.state in (BOOTING, R_READY, DRAINING)
        }
        for name in set(self._heard) - busy:
            del self._heard[name]
        now = self.clock()
        limit = self.config.timeouts.host_lost_s
        for name in sorted(busy):
            heard = self._heard.setdefault(name, now)
            if now - heard > limit:
                self._host_lost(name, now - heard)
            elif name not in self._probing and (agent := self.placement.agent(name)):
                self._probing.add(name)
                self._spawn(self._probe(agent))

    async def _probe(self, agent: AgentClient) -> None:
        try:
            await agent.health(timeout_s=self.config.timeouts.host_lost_s)
            answered = True
        except AgentError as exc:
            answered = exc.status is not None  # it answered, with an error: the host is up
        finally:
            self._probing.discard(agent.name)
        if answered and agent.name in self._heard:
            self._heard[agent.name] = self.clock()

    def _host_lost(self, name: str, silent_s: float) -> None:
        del self._heard[name]
        lost = [
            (pool, replica)
            for pool in self.pools.values()
            for replica in pool.replicas.values()
            if replica.agent == name and replica.state not in (UNHEALTHY, GONE)
        ]
        logger.warning(
            "host %s lost: its agent has not answered for %.1f s; replacing its %d replica(s)",
            name,
            silent_s,
            len(lost),
        )
        self.metrics.host_losses.labels(name).inc()
        reason = f"host {name} lost (agent silent for {silent_s:.1f} s)"
        for pool, replica in lost:
            replica.lost = True
            replica.abort()  # every request still waiting on it ends now
            self._fail(pool, replica, "host_lost", reason)
        if self._buffered is not None:
            self._spawn(self._buffered.host_lost(name, reason))
