"""Hosts of the cloud buffer: their lifecycle state machine, and the providers that hand them over.

    provisioning -> checking -> idle (the buffer) -> assigned -> draining -> released
                        ^         |                                  |
                        +---------+ (deep check of an idle host)     +-> checking (recycled)

    any live state -> quarantined (with the reason) -> released (by an operator, never assigned)

A `Provider` acquires and releases hosts of a host type; `StaticProvider` hands out a fixed list
of agents (address + token) from the config, the embedded default; `KubernetesProvider`
(fastboot.buffer.kubernetes) hands out GPU nodes held by balloon pods and, through its optional
`quarantine(spec, reason)`, taints and cordons the nodes the manager quarantines.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NewType, Protocol, Self

import aiohttp
import yaml

from fastboot.buffer.agents import DEAD, FAILED, STOPPED, AgentClient, AgentEndpoint
from fastboot.errors import AgentError, IllegalTransitionError, UsageError

log = logging.getLogger(__name__)

HostId = NewType("HostId", str)


class HostState(enum.Enum):
    """Where a host is in its life."""

    PROVISIONING = "provisioning"  # asked of the provider, not delivered yet
    CHECKING = "checking"  # delivered (or idle), running a health check
    IDLE = "idle"  # healthy, in the buffer, ready to be assigned
    ASSIGNED = "assigned"  # given to a replica (checked on assignment)
    DRAINING = "draining"  # its replicas are being stopped
    RELEASED = "released"  # handed back to the provider; final
    QUARANTINED = "quarantined"  # failed a check; never assigned again


#: Every legal move. Anything else raises IllegalTransitionError.
TRANSITIONS: Mapping[HostState, frozenset[HostState]] = {
    HostState.PROVISIONING: frozenset(
        {HostState.CHECKING, HostState.QUARANTINED, HostState.RELEASED}
    ),
    HostState.CHECKING: frozenset({HostState.IDLE, HostState.QUARANTINED, HostState.RELEASED}),
    HostState.IDLE: frozenset(
        {HostState.CHECKING, HostState.ASSIGNED, HostState.QUARANTINED, HostState.RELEASED}
    ),
    HostState.ASSIGNED: frozenset({HostState.DRAINING, HostState.QUARANTINED}),
    HostState.DRAINING: frozenset({HostState.RELEASED, HostState.CHECKING, HostState.QUARANTINED}),
    HostState.QUARANTINED: frozenset({HostState.RELEASED}),
    HostState.RELEASED: frozenset(),
}


@dataclass(frozen=True)
class HostSpec:
    """One host as the provider describes it: how to reach its agent."""

    name: str  #: unique host name (logs, metrics)
    address: str  #: the agent's base URL, e.g. http://10.0.0.5:8700 (no /v1)
    token: str = field(default="", repr=False)  #: the agent's bearer token; never logged
    host_type: str = "cpu"  #: the host type the buffer LP sizes (e.g. "h100-80g")
    kind: str = "cpu"  #: "cpu" or "gpu": which health checks apply
    local: bool = False  #: the agent runs on this machine, so local self-tests can run here

    @property
    def id(self) -> HostId:
        """The host's id (its name)."""
        return HostId(self.name)


@dataclass(frozen=True)
class Transition:
    """One recorded move of a host."""

    at: float  #: time.monotonic() of the move
    before: HostState  #: state left
    after: HostState  #: state entered
    reason: str  #: why (check results, "taken", "surplus"...)


class Host:
    """A host and its lifecycle. Moves only through `move`, which enforces TRANSITIONS."""

    def __init__(self, spec: HostSpec, state: HostState = HostState.PROVISIONING) -> None:
        self.spec = spec
        self.state = state
        self.reason = ""
        self.history: list[Transition] = []
        self.since = time.monotonic()
        #: When the last deep check passed (time.monotonic()); None: never.
        self.deep_checked_at: float | None = None

    @property
    def id(self) -> HostId:
        return self.spec.id

    @property
    def host_type(self) -> str:
        return self.spec.host_type

    def move(self, to: HostState, reason: str = "") -> None:
        """Enter state `to`, or raise IllegalTransitionError (a quarantined host stays out)."""
        if to not in TRANSITIONS[self.state]:
            why = f" (quarantined: {self.reason})" if self.state is HostState.QUARANTINED else ""
            raise IllegalTransitionError(
                f"host {self.spec.name} cannot go from {self.state.value} to {to.value}{why}; "
                f"allowed: {sorted(s.value for s in TRANSITIONS[self.state]) or 'none'}"
            )
        now = time.monotonic()
        self.history.append(Transition(now, self.state, to, reason))
        log.debug(
            "host %s: %s -> %s after %.2f s%s",
            self.spec.name,
            self.state.value,
            to.value,
            now - self.since,
            f" ({reason})" if reason else "",
        )
        self.state, self.reason, self.since = to, reason, now

    def __repr__(self) -> str:
        return f"Host({self.spec.name}, {self.state.value})"


class Provider(Protocol):
    """Where hosts come from and go back to.

    Two optional hooks, called when a provider has them: `async lost(spec)` takes back a host
    whose agent went silent (else `release`); `async quarantine(spec, reason)` fences a host
    outside fastboot too (the Kubernetes provider taints and cordons its node).
    """

    async def acquire(self, host_type: str) -> HostSpec | None:
        """Deliver one host of `host_type` (waiting as long as delivery takes); None when the
        provider has none to give now (supply exhausted)."""
        ...

    async def release(self, spec: HostSpec) -> None:
        """Take a host back (stop paying for it)."""
        ...

    def supply(self, host_type: str) -> int | None:
        """Hosts of `host_type` the provider could still deliver now; None if unknown."""
        ...


#: Seconds a lost host's agent gets for each call of its rejoin.
REJOIN_PROBE_S = 1.0


class StaticProvider:
    """A fixed list of agents from the config: acquiring hands out one not in use.

    Quarantined hosts are never released by the BufferManager, so they are never handed out again.
    A lost host (its agent went silent) is handed out again only once its agent answers: a
    restarted agent or a healed partition rejoins the buffer through the usual short check.
    """

    def __init__(self, hosts: Iterable[HostSpec]) -> None:
        self.hosts: list[HostSpec] = list(hosts)
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise UsageError(f"static hosts must have distinct names (got {names})")
        self._in_use: set[str] = set()
        self._lost: set[str] = set()
        self._lock = asyncio.Lock()

    @classmethod
    def from_config(cls, entries: Sequence[Mapping[str, Any]], base: Path | None = None) -> Self:
        """Hosts from config entries: {name?, address, token | token_file, host_type?, kind?,
        local?}. A relative token_file is read relative to `base`."""
        specs = []
        for index, entry in enumerate(entries):
            where = f"hosts[{index}]"
            if "address" not in entry:
                raise UsageError(f"{where}: every host needs an address (the agent's base URL)")
            token = str(entry.get("token", ""))
            if token_file := entry.get("token_file"):
                path = Path(str(token_file))
                if base is not None and not path.is_absolute():
                    path = base / path
                try:
                    token = path.read_text().strip()
                except OSError as exc:
                    raise UsageError(f"{where}: cannot read token_file {path}: {exc}") from exc
            kind = str(entry.get("kind", "cpu"))
            if kind not in ("cpu", "gpu"):
                raise UsageError(f"{where}: kind must be cpu or gpu, not {kind!r}")
            address = str(entry["address"]).rstrip("/")
            specs.append(
                HostSpec(
                    name=str(entry.get("name") or address),
                    address=address,
                    token=token,
                    host_type=str(entry.get("host_type", kind)),
                    kind=kind,
                    local=bool(entry.get("local", False)),
                )
            )
        return cls(specs)

    @classmethod
    def from_file(cls, path: Path) -> Self:
        """Hosts from a YAML file with a top-level `hosts:` list (see from_config)."""
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"cannot read the host list {path}: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("hosts"), list):
            raise UsageError(f"{path}: expected a top-level `hosts:` list")
        return cls.from_config(doc["hosts"], base=path.parent)

    async def acquire(self, host_type: str) -> HostSpec | None:
        async with self._lock:
            for spec in self.hosts:
                if spec.host_type != host_type or spec.name in self._in_use:
                    continue
                if spec.name in self._lost:
                    if not await rejoin(spec, REJOIN_PROBE_S):
                        continue
                    log.info("lost host %s answers again: it rejoins", spec.name)
                    self._lost.discard(spec.name)
                self._in_use.add(spec.name)
                return spec
        return None

    async def release(self, spec: HostSpec) -> None:
        async with self._lock:
            self._in_use.discard(spec.name)

    async def lost(self, spec: HostSpec) -> None:
        """Take back a host whose agent went silent; it rejoins once the agent answers."""
        async with self._lock:
            self._in_use.discard(spec.name)
            self._lost.add(spec.name)

    def supply(self, host_type: str) -> int | None:
        return sum(
            1
            for h in self.hosts
            if h.host_type == host_type and h.name not in self._in_use | self._lost
        )


async def rejoin(spec: HostSpec, timeout_s: float) -> bool:
    """Whether a lost host's agent answers again (within timeout_s a call); if so, the replicas
    it still runs (a healed partition: nobody routes to them any more) are deleted first, so the
    host comes back empty, as a buffer host must."""
    endpoint = AgentEndpoint(url=spec.address, token=spec.token, name=spec.name)
    async with aiohttp.ClientSession() as session:
        client = AgentClient(endpoint, session, timeout_s)
        try:
            await client.health()
            for stale in await client.list_replicas():
                if stale.state in (STOPPED, FAILED, DEAD):
                    continue
                log.info("host %s: deleting replica %s left from before", spec.name, stale.id)
                await client.delete_replica(stale.id)
        except AgentError as exc:
            log.debug("lost host %s does not rejoin yet: %s", spec.name, exc)
            return False
    return True
