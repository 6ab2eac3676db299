"""Placement through the buffer: the router's agents are the hosts a BufferManager assigned.

`BufferedPlacement` answers what the router asks of `fastboot.router.placement.Placement`
(`agents`, `agent(name)`, `place(snapshot)`, `on_error`) and adds one hook, `replica_gone`:

- `place(snapshot)` first tries the hosts it already holds that have a slot it has not used,
  then takes a healthy idle host from the buffer (`BufferManager.acquire`: short-checked on
  assignment, replacement ordered at once) and starts the replica through that host's agent.
- `replica_gone(agent, replica_id)`, called by the router once a replica is deleted (or known
  gone), hands a host whose last replica is gone back to the buffer (`BufferManager.release`:
  idle again after a short check while the buffer is short, otherwise back to the provider).
- `host_lost(agent, reason)`, called by the router when an agent went silent, drops the host
  and its replicas from the books and hands it to the buffer as lost (`BufferManager.lost`).
- An agent that fails the first request after its host passed its check (unreachable, 401, 5xx)
  gets its host quarantined with the reason; a request the agent rejects for the request's sake
  (unknown snapshot, bad body, full) hands the host back instead.

The router's own session is used for every agent call; the manager's lifecycle (start/stop)
stays with whoever made it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from fastboot.buffer.agents import AgentClient, AgentEndpoint, ReplicaInfo
from fastboot.buffer.hosts import Host, HostState
from fastboot.buffer.manager import BufferManager
from fastboot.errors import AgentError, NoHostAvailableError

log = logging.getLogger(__name__)

#: Agent answers that are the request's fault, not the host's: the host goes back, unblamed.
NOT_THE_HOSTS_FAULT = frozenset({400, 404, 409, 422})


@dataclass
class Held:
    """A host this placement holds (ASSIGNED by the buffer) and what runs on it."""

    host: Host  #: the buffer's host, ASSIGNED
    client: AgentClient  #: its agent
    slots: int  #: replicas its agent said it can run
    replicas: set[str] = field(default_factory=set)  #: replica ids placed here, not yet gone


class BufferedPlacement:
    """Chooses an agent for each new replica among hosts taken from a BufferManager."""

    def __init__(
        self,
        manager: BufferManager,
        session: aiohttp.ClientSession,
        host_type: str = "cpu",
        agent_timeout_s: float = 10.0,
        acquire_timeout_s: float | None = None,
    ) -> None:
        self.manager = manager
        self.host_type = host_type
        self.acquire_timeout_s = acquire_timeout_s
        self._session = session
        self._agent_timeout_s = agent_timeout_s
        self._held: dict[str, Held] = {}
        self._lock = asyncio.Lock()
        #: Callables (agent name, reason) for metrics, as Placement.on_error.
        self.on_error: list[Callable[[str, str], object]] = []

    @property
    def agents(self) -> list[AgentClient]:
        """The agents of the hosts held now (the router adopts and health-checks these)."""
        return [held.client for held in self._held.values()]

    @property
    def held(self) -> dict[str, Held]:
        """Held hosts by agent name (read-only use)."""
        return dict(self._held)

    def agent(self, name: str) -> AgentClient | None:
        held = self._held.get(name)
        return held.client if held else None

    async def place(self, snapshot: str | Sequence[str]) -> tuple[AgentClient, ReplicaInfo]:
        """Start one replica of `snapshot`: on a held host with a spare slot, else on a host
        taken from the buffer. Raises AgentError when neither worked (the router backs off)."""
        started = time.monotonic()
        for held in sorted(self._held.values(), key=lambda h: len(h.replicas) - h.slots):
            if len(held.replicas) >= held.slots:
                continue
            try:
                info = await self._start(held, snapshot)
            except AgentError as exc:
                self._report(held.client.name, "full" if exc.status == 409 else "refused", exc)
                continue
            log.debug("placed %s on held host %s", snapshot, held.client.name)
            return held.client, info
        try:
            host = await self.manager.acquire(self.host_type, self.acquire_timeout_s)
        except NoHostAvailableError as exc:
            raise AgentError("(buffer)", str(exc)) from exc
        held = await self._hold(host)
        try:
            info = await self._start(held, snapshot)
        except AgentError as exc:
            await self._drop(held, exc)
            raise
        log.info(
            "placed %s on %s, taken from the buffer, in %.2f s",
            snapshot,
            held.client.name,
            time.monotonic() - started,
        )
        return held.client, info

    async def replica_gone(self, agent: str, replica_id: str) -> None:
        """The router deleted `replica_id` on `agent` (or learnt it is gone). A host left
        without replicas goes back to the buffer."""
        held = self._held.get(agent)
        if held is None:
            return
        held.replicas.discard(replica_id)
        if held.replicas:
            return
        async with self._lock:
            if held.replicas or self._held.get(agent) is not held:
                return
            del self._held[agent]
        if held.host.state is HostState.ASSIGNED:
            await self.manager.release(held.host, "no replicas left")

    async def host_lost(self, agent: str, reason: str) -> None:
        """`agent` went silent: forget what runs there; its host leaves the buffer as lost."""
        async with self._lock:
            held = self._held.pop(agent, None)
        if held is not None and held.host.state is HostState.ASSIGNED:
            await self.manager.lost(held.host, reason)

    async def _hold(self, host: Host) -> Held:
        spec = host.spec
        config = AgentEndpoint(url=spec.address, token=spec.token, name=spec.name)
        client = AgentClient(config, self._session, self._agent_timeout_s)
        held = Held(host, client, slots=1)
        try:
            doc = await client.resources()
            held.slots = max(1, int(doc.get("slots_free", 1) or 1))
        except AgentError as exc:
            await self._drop(held, exc)
            raise
        self._held[client.name] = held
        return held

    async def _start(self, held: Held, snapshot: str | Sequence[str]) -> ReplicaInfo:
        replicas = await held.client.create_replicas(snapshot, 1)
        if not replicas:
            raise AgentError(held.client.name, "accepted the replica but returned none", 500)
        held.replicas.add(replicas[0].id)
        return replicas[0]

    async def _drop(self, held: Held, exc: AgentError) -> None:
        """A freshly taken host whose agent failed the first request: quarantine the host when
        it is the host's fault, otherwise hand it back unblamed."""
        self._held.pop(held.client.name, None)
        if held.replicas or held.host.state is not HostState.ASSIGNED:
            return
        if exc.status in NOT_THE_HOSTS_FAULT:
            self._report(held.client.name, "refused", exc)
            await self.manager.release(held.host, f"agent refused the request: {exc.agent_message}")
            return
        self._report(held.client.name, "unreachable" if exc.status is None else "refused", exc)
        self.manager.quarantine(
            held.host, f"agent failed right after its check: {exc.agent_message}"
        )

    def _report(self, agent: str, reason: str, exc: AgentError) -> None:
        log.warning("buffered placement: %s", exc)
        for callback in self.on_error:
            callback(agent, reason)
