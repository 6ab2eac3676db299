"""The router's HTTP front: OpenAI-compatible routes on aiohttp, proxied to replicas as bytes.

Request path: check the key, read the body (bounded), parse it once to learn the model, the
stream flag and the prompt's leading text, take a replica slot (or queue for one), forward the
original bytes over the replica's pooled connection, and pass the answer back — SSE streams
chunk by chunk without parsing them. Everything else (placement, health, autoscaling) runs in
the Controller's tasks, off this path; /health and /metrics read local state only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from fastboot.errors import FastbootError
from fastboot.router.balancer import Balancer, prompt_text
from fastboot.router.config import RouterConfig
from fastboot.router.controller import Controller
from fastboot.router.metrics import RouterMetrics
from fastboot.router.pool import ModelPool, QueueFull, QueueTimeout
from fastboot.router.queue import Waiter
from fastboot.router.upstream import RoutedReplica

logger = logging.getLogger(__name__)

#: Response headers not passed back: hop-by-hop, or set by our own server.
DROP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Transfer-Encoding",
        "Content-Length",
        "Date",
        "Server",
        "Upgrade",
        "Proxy-Connection",
        "TE",
        "Trailer",
    )
)
PROXIED_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")


def error_response(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def sse_error(message: str, code: str) -> bytes:
    """An error event for a stream that already started (the status line is long gone)."""
    doc = {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


class _Retry(FastbootError):
    """The replica refused the connection before anything was sent: try another."""


class Router:
    """The router process: pools per model, the controller, and the HTTP server."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.balancer = Balancer(
            config.prefix_block_chars,
            config.prefix_blocks,
            config.prefix_imbalance,
            config.prefix_ttl_s,
            config.prefix_entries,
        )
        self.pools = {m.name: ModelPool(m, self.balancer, self.metrics) for m in config.models}
        self.controller = Controller(config, self.pools, self.metrics)
        self._key_digests = frozenset(hashlib.sha256(k.encode()).digest() for k in config.api_keys)
        self._created = int(time.time())
        self._runner: web.AppRunner | None = None
        self.port = config.port
        self.app = self._build_app()

    # --- lifecycle -------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        for path in PROXIED_ROUTES:
            app.router.add_post(path, self._proxy)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{name:.+}", self._model)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> None:
        """Adopt or place replicas, then listen on config.host:config.port (0: any free port)."""
        await self.controller.start()
        # handler_cancellation: a client that goes away cancels its handler, which closes the
        # upstream connection, which makes the engine abort the request.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.config.host, self.config.port, backlog=2048, reuse_address=True
        )
        await site.start()
        address = self._runner.addresses[0]
        self.port = int(address[1])
        logger.info(
            "router listening on http://%s:%d (%d models, %d agents)",
            self.config.host,
            self.port,
            len(self.pools),
            len(self.config.agents),
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.controller.stop()

    # --- helpers ---------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        if not self._key_digests:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return False
        return hashlib.sha256(key.strip().encode()).digest() in self._key_digests

    def _unauthorized(self) -> web.Response:
        return error_response(
            401,
            "missing or invalid API key: send Authorization: Bearer KEY with a key from the "
            "router's api_keys",
            "authentication_error",
            "invalid_api_key",
        )

    def _model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self._created, "owned_by": "fastboot"}

    # --- routes ----------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        models = {
            name: {
                "ready": len(pool.ready()),
                "replicas": len(pool.replicas),
                "queued": len(pool.queue),
                "inflight": pool.inflight(),
                "members": [
                    {"id": r.id, "agent": r.agent, "state": r.state, "inflight": r.inflight}
                    for r in pool.replicas.values()
                ],
            }
            for name, pool in self.pools.items()
        }
        doc: dict[str, Any] = {"status": "ok", "models": models}
        if (buffer := self.controller.buffer_hosts()) is not None:
            doc["buffer"] = buffer
        return web.json_response(doc)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": self.metrics.content_type})

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        data = [self._model_card(name) for name in self.pools]
        return web.json_response({"object": "list", "data": data})

    async def _model(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        name = request.match_info["name"]
        if name not in self.pools:
            return self._unknown_model(name)
        return web.json_response(self._model_card(name))

    def _unknown_model(self, name: str) -> web.Response:
        return error_response(
            404,
            f"the model {name!r} does not exist here; GET /v1/models lists the served ones",
            "invalid_request_error",
            "model_not_found",
        )

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        if not self._authorized(request):
            return self._finish(None, self._unauthorized(), arrived)
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._finish(None, self._too_large(), arrived)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._finish(None, self._too_large(), arrived)
        try:
            doc = json.loads(body)
        except ValueError as exc:
            return self._finish(
                None,
                error_response(
                    400,
                    f"the body is not valid JSON: {exc}",
                    "invalid_request_error",
                    "invalid_json",
                ),
                arrived,
            )
        name = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(name, str):
            return self._finish(
                None,
                error_response(
                    400,
                    "the body must be a JSON object with a string `model`",
                    "invalid_request_error",
                    "invalid_request",
                ),
                arrived,
            )
        pool = self.pools.get(name)
        if pool is None:
            return self._finish(None, self._unknown_model(name), arrived)
        keys = self.balancer.prefix_keys(prompt_text(doc, self.balancer.text_limit))
        try:
            return await self._route(request, pool, body, doc, keys, arrived)
        except asyncio.CancelledError:
            # The client went away (queued or mid-answer); 499 as nginx logs it.
            self._count(name, 499, arrived)
            raise

    async def _route(
        self,
        request: web.Request,
        pool: ModelPool,
        body: bytes,
        doc: dict[str, Any],
        keys: list[int],
        arrived: float,
    ) -> web.StreamResponse:
        name = pool.name
        deadline = arrived + pool.config.queue_deadline_s
        for _attempt in range(3):
            try:
                replica, waiter = await pool.acquire(keys, deadline)
            except QueueFull:
                self.metrics.rejections.labels(name, "full").inc()
                retry = pool.retry_after_s()
                response = error_response(
                    429,
                    f"{name} has {pool.config.queue_max} requests waiting already; retry in "
                    f"{retry} s",
                    "rate_limit_error",
                    "queue_full",
                    headers={"Retry-After": str(retry)},
                )
                return self._finish(name, response, arrived)
            except QueueTimeout as exc:
                self.metrics.rejections.labels(name, "deadline").inc()
                response = error_response(
                    503,
                    f"no replica of {name} could take the request within "
                    f"{pool.config.queue_deadline_s:g} s: {exc}",
                    "service_unavailable_error",
                    "no_replica",
                )
                return self._finish(name, response, arrived)
            try:
                return await self._forward(request, pool, replica, body, doc, waiter, arrived)
            except _Retry:
                continue
            finally:
                pool.release(replica)
        return self._finish(
            name,
            error_response(
                502,
                f"replicas of {name} refused the connection three times: {pool.last_error}",
                "upstream_error",
                "replica_failed",
            ),
            arrived,
        )

    def _too_large(self) -> web.Response:
        return error_response(
            413,
            f"the request body is over the router's limit of {self.config.max_body_bytes} bytes",
            "invalid_request_error",
            "body_too_large",
        )

    def _finish(
        self, model: str | None, response: web.StreamResponse, arrived: float
    ) -> web.StreamResponse:
        self._count(model, response.status, arrived)
        return response

    def _count(self, model: str | None, status: int, arrived: float) -> None:
        label = model or "-"
        self.metrics.requests.labels(label, str(status)).inc()
        self.metrics.duration.labels(label).observe(time.monotonic() - arrived)

    async def _forward(
        self,
        request: web.Request,
        pool: ModelPool,
        replica: RoutedReplica,
        body: bytes,
        doc: dict[str, Any],
        waiter: Waiter | None,
        arrived: float,
    ) -> web.StreamResponse:
        upstream = replica.upstream
        assert upstream is not None
        if replica.served_model != pool.name:
            body = json.dumps({**doc, "model": replica.served_model}).encode()
        headers = {"Content-Type": "application/json"}
        if accept := request.headers.get("Accept"):
            headers["Accept"] = accept
        timeouts = self.config.timeouts
        dispatched = time.monotonic()
        queued_s = dispatched - waiter.enqueued if waiter is not None else 0.0
        pre = dispatched - arrived - queued_s
        try:
            async with replica.bounded(timeouts.first_byte_s):
                response = await upstream.session.post(
                    upstream.address + request.path, data=body, headers=headers
                )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # Nothing reached the engine: safe to send the request to another replica.
            self.controller.replica_failed(pool, replica, f"cannot connect: {exc}")
            raise _Retry from exc
        except TimeoutError as exc:
            if replica.lost:
                raise _Retry from exc  # aborted: its host is gone and it sent nothing
            return self._finish(
                pool.name,
                error_response(
                    504,
                    f"replica {replica.id} of {pool.name} sent nothing within "
                    f"{timeouts.first_byte_s:g} s",
                    "upstream_error",
                    "upstream_timeout",
                ),
                arrived,
            )
        except aiohttp.ClientError as exc:
            if replica.lost:
                # Its host is gone and it sent nothing: another replica answers instead.
                raise _Retry from exc
            return self._crashed(pool, replica, exc, arrived)
        try:
            out_headers = CIMultiDict(
                (k, v) for k, v in response.headers.items() if k.lower() not in DROP_HEADERS
            )
            if response.content_type != "text/event-stream":
                try:
                    async with replica.bounded(timeouts.idle_s):
                        payload = await response.read()
                except TimeoutError as exc:
                    if replica.lost:
                        return self._crashed(pool, replica, exc, arrived)
                    return self._idle_timeout(pool, replica, arrived)
                except aiohttp.ClientError as exc:
                    return self._crashed(pool, replica, exc, arrived)
                self._first_byte(pool, waiter, arrived)
                done = time.monotonic()
                result = web.Response(body=payload, status=response.status, headers=out_headers)
                self.metrics.overhead.observe(pre + time.monotonic() - done)
                return self._finish(pool.name, result, arrived)
            return await self._stream(
                request, pool, replica, response, out_headers, waiter, arrived, pre
            )
        finally:
            # Closing (not releasing) an unfinished response drops the connection, which is how
            # the engine learns that the client went away.
            if not response.closed:
                response.close()

    async def _stream(
        self,
        request: web.Request,
        pool: ModelPool,
        replica: RoutedReplica,
        response: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        waiter: Waiter | None,
        arrived: float,
        pre: float,
    ) -> web.StreamResponse:
        out = web.StreamResponse(status=response.status, headers=headers)
        await out.prepare(request)
        idle = self.config.timeouts.idle_s
        first = True
        content = response.content
        try:
            while True:
                async with replica.bounded(idle):
                    chunk = await content.readany()
                if not chunk:
                    break
                if first:
                    self._first_byte(pool, waiter, arrived)
                    first = False
                await out.write(chunk)
        except TimeoutError:
            if replica.lost:
                message = f"the host of replica {replica.id} of {pool.name} was lost; retry"
                await self._write_quietly(out, sse_error(message, "replica_failed"), eof=False)
            else:
                logger.warning("%s replica %s: stream idle for %g s", pool.name, replica.id, idle)
                message = f"replica {replica.id} sent nothing for {idle:g} s"
                await self._write_quietly(out, sse_error(message, "upstream_timeout"), eof=False)
        except aiohttp.ClientError as exc:
            self.controller.replica_failed(pool, replica, f"stream broke: {exc}")
            await self._write_quietly(
                out,
                sse_error(
                    f"replica {replica.id} of {pool.name} failed mid-stream "
                    f"({type(exc).__name__}); retry the request",
                    "replica_failed",
                ),
                eof=False,
            )
        except ConnectionError:
            # The client went away while we wrote; the finally in _forward drops the upstream.
            self._finish(pool.name, out, arrived)
            return out
        done = time.monotonic()
        await self._write_quietly(out, b"", eof=True)
        self.metrics.overhead.observe(pre + time.monotonic() - done)
        return self._finish(pool.name, out, arrived)

    @staticmethod
    async def _write_quietly(out: web.StreamResponse, data: bytes, eof: bool = True) -> None:
        try:
            if data:
                await out.write(data)
            if eof:
                await out.write_eof()
        except ConnectionError:
            pass

    def _first_byte(self, pool: ModelPool, waiter: Waiter | None, arrived: float) -> None:
        elapsed = time.monotonic() - arrived
        self.metrics.ttfb.labels(pool.name).observe(elapsed)
        if waiter is not None and waiter.trigger:
            self.metrics.cold_start.labels(pool.name).observe(elapsed)
            logger.info("%s cold start: first token %.2f s after the request", pool.name, elapsed)

    def _crashed(
        self, pool: ModelPool, replica: RoutedReplica, exc: BaseException, arrived: float
    ) -> web.StreamResponse:
        self.controller.replica_failed(pool, replica, f"{type(exc).__name__}: {exc}")
        return self._finish(
            pool.name,
            error_response(
                502,
                f"replica {replica.id} of {pool.name} failed during the request "
                f"({type(exc).__name__}); it is being replaced, retry the request",
                "upstream_error",
                "replica_failed",
            ),
            arrived,
        )

    def _idle_timeout(
        self, pool: ModelPool, replica: RoutedReplica, arrived: float
    ) -> web.StreamResponse:
        return self._finish(
            pool.name,
            error_response(
                504,
                f"replica {replica.id} of {pool.name} stopped sending for "
                f"{self.config.timeouts.idle_s:g} s",
                "upstream_error",
                "upstream_timeout",
            ),
            arrived,
        )
