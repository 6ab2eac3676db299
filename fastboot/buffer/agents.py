"""The client of each host's agent (docs/agent-api.md): what the buffer and the router call.

`AgentClient` is one agent's API; every call has a timeout and every failure becomes an
`AgentError` (status None when the agent could not be reached). `AgentEndpoint` says where an
agent is and how to authenticate (the router's `[[agents]]`, or a buffer host's address).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from fastboot.errors import AgentError


@dataclass(frozen=True)
class AgentEndpoint:
    """Where one per-host agent (docs/agent-api.md) listens and how to authenticate to it: a
    router's `[[agents]]` entry, or a buffer host's address and token."""

    #: Base address, e.g. http://10.0.0.5:8700 (no /v1).
    url: str
    #: Bearer token of the agent (from `token` or `token_file`); never logged.
    token: str = field(default="", repr=False)
    #: Name in logs and metrics (default: the url).
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.url


#: Replica states of the agent API.
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

    async def health(self, timeout_s: float | None = None) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s is not None else None
        doc: dict[str, Any] = await self._call("GET", "/v1/health", timeout=timeout)
        return doc

    async def resources(self) -> dict[str, Any]:
        doc: dict[str, Any] = await self._call("GET", "/v1/resources")
        return doc

    async def list_replicas(self) -> list[ReplicaInfo]:
        doc = await self._call("GET", "/v1/replicas")
        return [ReplicaInfo.from_json(r) for r in (doc or {}).get("replicas", [])]

    async def create_replicas(
        self, snapshot: str | Sequence[str], count: int = 1
    ) -> list[ReplicaInfo]:
        """Start count replicas of snapshot, or of the first of several snapshots (one per host
        type, preferred first) that the agent holds and its host can restore."""
        ids = [snapshot] if isinstance(snapshot, str) else list(snapshot)
        # One id in the form every agent version takes.
        which = {"snapshot": ids[0]} if len(ids) == 1 else {"snapshots": ids}
        doc = await self._call("POST", "/v1/replicas", {**which, "count": count})
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
