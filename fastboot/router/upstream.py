"""One replica as the router sees it, with its own pooled HTTP client.

Each ready replica gets one `aiohttp.ClientSession` with a keep-alive pool, created when it
becomes ready and closed when it goes away. The session never decompresses (bytes pass through
as the engine sent them) and has no overall timeout: the proxy applies the first-byte and idle
timeouts around each read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp

from fastboot.router.config import TimeoutConfig

BOOTING, READY, DRAINING, UNHEALTHY, GONE = "booting", "ready", "draining", "unhealthy", "gone"


class Upstream:
    """A keep-alive connection pool to one replica."""

    def __init__(self, address: str, timeouts: TimeoutConfig) -> None:
        self.address = address.rstrip("/")
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0, ttl_dns_cache=None)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect_s),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        await self.session.close()


class RoutedReplica:
    """A replica of one model: where it is, its state, and the router's in-flight count."""

    __slots__ = (
        "address",
        "agent",
        "cap",
        "created",
        "id",
        "inflight",
        "last_active",
        "lost",
        "model",
        "served_model",
        "state",
        "upstream",
        "waits",
    )

    def __init__(
        self, replica_id: str, model: str, agent: str, address: str, served_model: str, cap: int
    ) -> None:
        #: Agent-assigned id.
        self.id = replica_id
        #: Public model name it serves.
        self.model = model
        #: Name of the agent that owns it.
        self.agent = agent
        #: http://IP:PORT.
        self.address = address
        #: Model name the engine expects in requests.
        self.served_model = served_model
        #: Concurrency cap.
        self.cap = cap
        #: booting | ready | draining | unhealthy | gone.
        self.state = BOOTING
        #: Requests dispatched to it and not finished (counted at dispatch, by the router).
        self.inflight = 0
        #: Monotonic time it was created / last finished a request.
        self.created = self.last_active = time.monotonic()
        #: Pooled client, set when ready.
        self.upstream: Upstream | None = None
        #: Its host was lost (agent silent past host_lost_s): requests it had not answered yet
        #: are sent to another replica; nobody else can see what it produced.
        self.lost = False
        #: The deadlines of every read waiting on it now; a lost host's are moved to now.
        self.waits: set[asyncio.Timeout] = set()

    @contextlib.asynccontextmanager
    async def bounded(self, seconds: float) -> AsyncIterator[None]:
        """asyncio.timeout(seconds) around one read from this replica, which `abort` ends."""
        async with asyncio.timeout(seconds) as timeout:
            self.waits.add(timeout)
            try:
                yield
            finally:
                self.waits.discard(timeout)

    def abort(self) -> None:
        """End every read waiting on it now, with TimeoutError (its host is lost: on a
        partition nothing would ever arrive, nor any reset)."""
        now = asyncio.get_running_loop().time()
        for timeout in list(self.waits):
            timeout.reschedule(now)

    @property
    def has_room(self) -> bool:
        return self.state == READY and self.inflight < self.cap

    def __repr__(self) -> str:
        return f"RoutedReplica({self.id} {self.model} {self.state} {self.inflight}/{self.cap})"
