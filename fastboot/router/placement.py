"""Choosing where a replica goes among statically configured agents.

`Placement` tries the agents that report free slots, most free first, until one accepts; the
agents' client is fastboot.buffer.agents (the buffer places through it too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from fastboot.buffer.agents import AgentClient, ReplicaInfo
from fastboot.errors import AgentError

logger = logging.getLogger(__name__)


class Placement:
    """Chooses an agent for each new replica: those with free slots, most free first."""

    def __init__(self, agents: Sequence[AgentClient], probe_timeout_s: float = 2.0) -> None:
        self.agents = list(agents)
        #: How long each agent gets to say its free slots: a silent (lost) agent must not hold
        #: up a placement for the whole agent timeout.
        self.probe_timeout_s = probe_timeout_s
        self._by_name = {a.name: a for a in self.agents}
        self.on_error: list[Any] = []  # callables (agent, reason) for metrics

    def agent(self, name: str) -> AgentClient | None:
        return self._by_name.get(name)

    async def _free_slots(self, agent: AgentClient) -> int:
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                doc = await agent.resources()
        except AgentError as exc:
            self._report(agent, "unreachable" if exc.status is None else "refused", exc)
            return -1
        except TimeoutError:
            message = f"GET /v1/resources: no answer within {self.probe_timeout_s:g} s"
            self._report(agent, "unreachable", AgentError(agent.name, message))
            return -1
        return int(doc.get("slots_free", 0) or 0)

    async def place(self, snapshot: str | Sequence[str]) -> tuple[AgentClient, ReplicaInfo]:
        """Start one replica of `snapshot` on the first agent that takes it. Several ids are
        one model's snapshots for different host types: each agent restores the first of them
        that its host can (a 422 from an agent whose host fits none sends the replica on).

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
