"""Talking to the per-host agents (docs/agent-api.md) and choosing where a replica goes.

`AgentClient` is one agent's API; every call has a timeout and every failure becomes an
`AgentError` (status None when the agent could not be reached). `Placement` tries the agents
that report free slots, most free first, until one accepts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from fastboot.errors import AgentError
from fastboot.router.config import AgentEndpoint

logger = logging.getLogger(__name__)

#: RoutedReplica states of the agent API.
RESTORING, READY, STOPPED, FAILED, DEAD = "restoring", "ready", "stopped", "failed", "dead"
FINAL_STATES = frozenset({READY, STOPPED, FAILED, DEAD})


@dataclass(frozen=True)
class ReplicaInfo:
    """A REPLICA object of the agent API."""

    #: Agent-assigned id.
    id: str
    #: Snapshot id it was restored from.
    snapshot: str
    #: The model name the engine serves.
    model: str
    #: restoring | ready | stopped | failed | dead.
    state: str
    #: http://IP:PORT reachable from the agent's host (and, in a fleet, from the router).
    address: str
    #: Why it failed or died, if it did.
    error: str | None = None
    #: The agent's timings: restore_s, ready_s.
    timings: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ReplicaInfo:
        timings = doc.get("timings") or {}
        return cls(
            id=str(doc["id"]),
            snapshot=str(doc.get("snapshot") or ""),
            model=str(doc.get("model") or ""),
            state=str(doc.get("state") or ""),
            address=str(doc.get("address") or "").rstrip("/"),
            error=doc.get("error"),
            timings={k: float(v) for k, v in timings.items() if isinstance(v, int | float)},
        )


class AgentClient:
    """One agent's HTTP API over a shared session."""

    def __init__(
        self, config: AgentEndpoint, session: aiohttp.ClientSession, timeout_s: float = 10.0
    ) -> None:
        self.config = config
        self.url = config.url.rstrip("/")
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}

    @property
    def name(self) -> str:
        return self.config.label

    async def _call(
        self,
        method: str,
        path: str,
        body: object = None,
        params: Mapping[str, str] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> Any:
        try:
            async with self._session.request(
                method,
                self.url + path,
                json=body,
                params=params,
                headers=self._headers,
                timeout=timeout or self._timeout,
            ) as response:
                try:
                    doc = await response.json(content_type=None)
                except ValueError:
                    doc = None
                if response.status >= 400:
                    message = response.reason or "error"
                    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
                        message = str(doc["error"].get("message") or message)
                    raise AgentError(self.name, f"{method} {path}: {message}", response.status)
                return doc
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
            raise AgentError(self.name, f"{method} {path} failed: {reason}") from exc

    async def health(self) -> dict[str, Any]:
        doc: dict[str, Any] = await self._call("GET", "/v1/health")
        return doc

    async def resources(self) -> dict[str, Any]:
        doc: dict[str, Any] = await self._call("GET", "/v1/resources")
        return doc

    async def list_replicas(self) -> list[ReplicaInfo]:
        doc = await self._call("GET", "/v1/replicas")
        return [ReplicaInfo.from_json(r) for r in (doc or {}).get("replicas", [])]

    async def create_replicas(self, snapshot: str, count: int = 1) -> list[ReplicaInfo]:
        doc = await self._call("POST", "/v1/replicas", {"snapshot": snapshot, "count": count})
        return [ReplicaInfo.from_json(r) for r in (doc or {}).get("replicas", [])]

    async def get_replica(self, replica_id: str) -> ReplicaInfo:
        return ReplicaInfo.from_json(await self._call("GET", f"/v1/replicas/{replica_id}"))

    async def wait_ready(self, replica_id: str, timeout_s: float) -> ReplicaInfo:
        """Long poll: the replica once it is ready, failed or dead, or as it is after timeout_s."""
        wait = max(1, round(timeout_s))
        doc = await self._call(
            "GET",
            f"/v1/replicas/{replica_id}",
            params={"wait": "ready", "timeout": str(wait)},
            timeout=aiohttp.ClientTimeout(total=wait + (self._timeout.total or 10.0)),
        )
        return ReplicaInfo.from_json(doc)

    async def delete_replica(self, replica_id: str) -> ReplicaInfo | None:
        doc = await self._call("DELETE", f"/v1/replicas/{replica_id}")
        return ReplicaInfo.from_json(doc) if doc else None


class Placement:
    """Chooses an agent for each new replica: those with free slots, most free first."""

    def __init__(self, agents: Sequence[AgentClient]) -> None:
        self.agents = list(agents)
        self._by_name = {a.name: a for a in self.agents}
        self.on_error: list[Any] = []  # callables (agent, reason) for metrics

    def agent(self, name: str) -> AgentClient | None:
        return self._by_name.get(name)

    async def _free_slots(self, agent: AgentClient) -> int:
        try:
            doc = await agent.resources()
        except AgentError as exc:
            self._report(agent, "unreachable" if exc.status is None else "refused", exc)
            return -1
        return int(doc.get("slots_free", 0) or 0)

    async def place(self, snapshot: str) -> tuple[AgentClient, ReplicaInfo]:
        """Start one replica of `snapshot` on the first agent that takes it.

        Raises AgentError naming every agent's reason when none could.
        """
        if not self.agents:
            raise AgentError("(none)", "no agents are configured; add [[agents]] to the config")
        started = time.monotonic()
        free = await asyncio.gather(*(self._free_slots(a) for a in self.agents))
        reasons: list[str] = []
        order = sorted(range(len(self.agents)), key=lambda i: -free[i])
        for index in order:
            agent = self.agents[index]
            if free[index] < 0:
                reasons.append(f"{agent.name}: unreachable")
                continue
            if free[index] == 0:
                reasons.append(f"{agent.name}: no free slots")
                continue
            try:
                replicas = await agent.create_replicas(snapshot, 1)
            except AgentError as exc:
                reason = "full" if exc.status == 409 else "refused"
                if exc.status is None:
                    reason = "unreachable"
                self._report(agent, reason, exc)
                reasons.append(f"{agent.name}: {exc.agent_message}")
                continue
            if not replicas:
                reasons.append(f"{agent.name}: accepted but returned no replica")
                continue
            logger.debug(
                "placed %s on %s in %.3f s", snapshot, agent.name, time.monotonic() - started
            )
            return agent, replicas[0]
        raise AgentError("(all)", "no agent could take a replica: " + "; ".join(reasons))

    def _report(self, agent: AgentClient, reason: str, exc: AgentError) -> None:
        logger.warning("placement: %s", exc)
        for callback in self.on_error:
            callback(agent.name, reason)
