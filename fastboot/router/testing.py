"""In-process fakes of an agent and of an engine, for the router's tests and benchmark.

Both are small aiohttp servers bound to 127.0.0.1 on a free port. `FakeAgent` speaks
docs/agent-api.md (token, resources, replicas with the `?wait=ready` long poll, DELETE);
`FakeEngine` answers the OpenAI routes with canned bodies and SSE streams and can be told to
stall, crash mid-answer or refuse. Neither is used by the router itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


async def start_site(app: web.Application, port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve `app` on 127.0.0.1:port (0: a free one); returns the runner and its base URL."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "fake"}}, status=status)


# --- engine ----------------------------------------------------------------------------------


@dataclass
class FakeEngine:
    """An OpenAI-compatible stand-in for a vLLM replica."""

    #: Name it reports in answers.
    name: str = "engine"
    #: Seconds before answering (non-streaming) or before the first chunk.
    delay_s: float = 0.0
    #: The SSE stream it sends, chunk by chunk (bytes exactly as written to the socket).
    chunks: list[bytes] = field(
        default_factory=lambda: [
            b'data: {"choices":[{"text":"Hel"}]}\n\n',
            b'data: {"choices":[{"text":"lo"}]}\n',
            b'\ndata: {"choices":[{"text":" wor',
            b'ld"}]}\n\ndata: [DONE]\n\n',
        ]
    )
    #: Seconds between stream chunks.
    chunk_delay_s: float = 0.0
    #: Abort the connection after this many chunks (streaming) or before answering (0), once
    #: per request, for the next `crashes` requests.
    crash_after: int = 0
    crashes: int = 0
    #: Never answer (a partitioned host: the connection stays open, nothing comes back).
    silent: bool = False
    #: Requests received: (path, parsed body).
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: Requests whose handler was cancelled because the other side went away.
    cancelled: int = 0
    #: Requests being handled now, and the most at once.
    active: int = 0
    peak: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
            app.router.add_post(path, self._answer)
        app.router.add_get("/health", self._health)
        self._runner, self.url = await start_site(app)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        self.requests.append((request.path, doc))
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await self._respond(request, doc)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def _respond(self, request: web.Request, doc: dict[str, Any]) -> web.StreamResponse:
        if self.silent:
            await asyncio.sleep(3600)  # cancelled when the router gives up on it
        crash = self.crashes > 0
        if crash:
            self.crashes -= 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if not doc.get("stream"):
            if crash:
                assert request.transport is not None
                request.transport.abort()
                await asyncio.sleep(3600)  # cancelled by the disconnect
            body = {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": doc.get("model"),
                "served_by": self.name,
                "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}],
            }
            return web.json_response(body)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for index, chunk in enumerate(self.chunks):
            if crash and index == self.crash_after:
                assert request.transport is not None
                request.transport.abort()
                await asyncio.sleep(3600)
            if index and self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            await out.write(chunk)
        await out.write_eof()
        return out


# --- agent -----------------------------------------------------------------------------------


@dataclass
class FakeAgent:
    """A per-host agent whose replicas are addresses of engines that already run.

    `address_for(snapshot)` gives the engine address of a new replica; it turns ready after
    `ready_after_s` (or when `make_ready` is called if that is None).
    """

    address_for: Callable[[str], str]
    token: str = "agent-token"
    slots: int = 4
    ready_after_s: float | None = 0.0
    #: Status to answer the next POSTs with (e.g. [409, 500]); consumed one per POST.
    refuse: list[int] = field(default_factory=list)
    #: Served model name reported for replicas (None: the snapshot id).
    model: str | None = None
    #: Replica ids are PREFIX1, PREFIX2, ... (distinct prefixes for several agents).
    id_prefix: str = "r"
    #: Never answer (a partitioned or powered-off host, as the router sees it).
    silent: bool = False
    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)
    posts: list[dict[str, Any]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None
    _events: dict[str, asyncio.Event] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, port: int = 0) -> str:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/v1/health", self._health)
        app.router.add_get("/v1/resources", self._resources)
        app.router.add_get("/v1/replicas", self._list)
        app.router.add_post("/v1/replicas", self._create)
        app.router.add_get("/v1/replicas/{id}", self._get)
        app.router.add_delete("/v1/replicas/{id}", self._delete)
        self._runner, self.url = await start_site(app, port)
        return self.url

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.silent:
            await asyncio.sleep(3600)  # the caller's timeout ends it
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _error(401, "bad token")
        response: web.StreamResponse = await handler(request)
        return response

    def live(self) -> list[dict[str, Any]]:
        return [r for r in self.replicas.values() if r["state"] in ("restoring", "ready")]

    def add_replica(self, snapshot: str, state: str = "restoring") -> dict[str, Any]:
        replica_id = f"{self.id_prefix}{next(self._ids)}"
        address = self.address_for(snapshot)
        replica = {
            "id": replica_id,
            "snapshot": snapshot,
            "model": self.model or snapshot,
            "state": state,
            "address": address,
            "base_url": address + "/v1",
            "created": time.time(),
            "age_s": 0.0,
            "timings": {"restore_s": 0.01, "ready_s": 0.02},
            "error": None,
        }
        self.replicas[replica_id] = replica
        self._events[replica_id] = asyncio.Event()
        if state == "ready":
            self._events[replica_id].set()
        return replica

    def set_state(self, replica_id: str, state: str, error: str | None = None) -> None:
        self.replicas[replica_id]["state"] = state
        self.replicas[replica_id]["error"] = error
        if state != "restoring":
            self._events[replica_id].set()

    def make_ready(self, replica_id: str) -> None:
        self.set_state(replica_id, "ready")

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "host": "fake", "replicas": len(self.live())})

    async def _resources(self, request: web.Request) -> web.Response:
        free = max(0, self.slots - len(self.live()))
        return web.json_response(
            {
                "kind": "cpu",
                "slots": self.slots,
                "slots_free": free,
                "memory_bytes": 8 << 30,
                "memory_available_bytes": 4 << 30,
                "gpus": [],
            }
        )

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response({"replicas": list(self.replicas.values())})

    async def _create(self, request: web.Request) -> web.Response:
        doc = await request.json()
        self.posts.append(doc)
        if self.refuse:
            status = self.refuse.pop(0)
            return _error(status, f"refused with {status}")
        count = int(doc.get("count", 1))
        if len(self.live()) + count > self.slots:
            return _error(409, "not enough free slots")
        made = [self.add_replica(str(doc["snapshot"])) for _ in range(count)]
        if self.ready_after_s is not None:
            for replica in made:
                task = asyncio.get_running_loop().create_task(self._ready_later(replica["id"]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return web.json_response({"replicas": made}, status=202)

    async def _ready_later(self, replica_id: str) -> None:
        await asyncio.sleep(self.ready_after_s or 0.0)
        if self.replicas[replica_id]["state"] == "restoring":
            self.make_ready(replica_id)

    async def _get(self, request: web.Request) -> web.Response:
        replica_id = request.match_info["id"]
        if replica_id not in self.replicas:
            return _error(404, f"no replica {replica_id}")
        if request.query.get("wait") == "ready":
            timeout = float(request.query.get("timeout", "30"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._events[replica_id].wait(), timeout)
        return web.json_response(self.replicas[replica_id])

    async def _delete(self, request: web.Request) -> web.Response:
        replica_id = request.match_info["id"]
        if replica_id not in self.replicas:
            return _error(404, f"no replica {replica_id}")
        self.deletes.append(replica_id)
        self.set_state(replica_id, "stopped")
        return web.json_response(self.replicas[replica_id])


def completion_body(model: str, stream: bool = False, prompt: str = "hello") -> bytes:
    return json.dumps(
        {"model": model, "prompt": prompt, "max_tokens": 4, "stream": stream}
    ).encode()
