"""The agent's HTTP API (docs/agent-api.md) on aiohttp, one asyncio loop (uvloop)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from fastboot import __version__
from fastboot.agent import pull, resources
from fastboot.agent.replicas import AgentConfig, Conflict, NotFound, ReplicaManager
from fastboot.errors import FastbootError, UsageError
from fastboot.host.supervisor import become_subreaper
from fastboot.snapshot import cpu_levels
from fastboot.snapshot.store import MANIFEST, Manifest, SnapshotInvalid

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MANAGER: web.AppKey[ReplicaManager] = web.AppKey("manager", ReplicaManager)
TOKEN: web.AppKey[str] = web.AppKey("token", str)
RESOURCES: web.AppKey[resources.Resources] = web.AppKey("resources", resources.Resources)
#: The longest a `?wait=ready` long poll may hold a request.
MAX_WAIT_S = 300.0


def error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind}}, status=status)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get("Authorization", "")
    want = f"Bearer {request.app[TOKEN]}"
    if not hmac.compare_digest(given.encode(), want.encode()):
        return error(401, "missing or wrong bearer token", "unauthorized")
    try:
        return await handler(request)
    except NotFound as exc:
        return error(404, str(exc), "not_found")
    except Conflict as exc:
        return error(409, str(exc), "insufficient_resources")
    except SnapshotInvalid as exc:
        return error(422, str(exc), "invalid_snapshot")
    except FastbootError as exc:
        return error(500, str(exc), "agent_error")


def _snapshot_json(m: Manifest, unfit: str | None = None) -> dict[str, Any]:
    model = m.key.get("model", {})
    return {
        "id": m.id,
        "engine": m.key.get("engine"),
        "engine_version": m.key.get("engine_version"),
        "model": model.get("path") or model.get("name"),
        "served_model_name": m.model_name,
        "size_bytes": m.total_bytes,
        "created": m.created,
        "cpu_baseline": m.key.get("cpu_baseline", cpu_levels.NATIVE),
        "fits_host": unfit is None,
        "unfit_reason": unfit,
    }


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": {"message": f"bad JSON: {exc}", "type": "bad_request"}}),
            content_type="application/json",
        ) from exc
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": {"message": "expected an object", "type": "bad_request"}}),
            content_type="application/json",
        )
    return body


async def health(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    return web.json_response(
        {
            "status": "ok",
            "host": socket.gethostname(),
            "agent": manager.config.name,
            "version": __version__,
            "replicas": manager.slots_used,
        }
    )


async def get_resources(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    fresh = await asyncio.to_thread(resources.probe, manager.config.slots)
    return web.json_response({**fresh.to_json(manager.slots_used), "host": resources.host()})


async def list_snapshots(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]

    def listed() -> list[dict[str, Any]]:
        return [_snapshot_json(m, manager.unfit(m)) for m in manager.snapshots()]

    return web.json_response({"snapshots": await asyncio.to_thread(listed)})


async def get_snapshot(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    manifest = manager.snapshot(request.match_info["id"])
    unfit = await asyncio.to_thread(manager.unfit, manifest)
    files = [
        {"name": k, "size": v["size"], "blake3": v["blake3"]} for k, v in manifest.files.items()
    ]
    return web.json_response({**_snapshot_json(manifest, unfit), "files": files})


async def get_snapshot_file(request: web.Request) -> web.StreamResponse:
    manager = request.app[MANAGER]
    manifest = manager.snapshot(request.match_info["id"])
    name = request.match_info["name"]
    if name != MANIFEST and name not in manifest.files:
        raise NotFound(f"snapshot {manifest.id} has no file {name!r}")
    return web.FileResponse(manager.config.store.path(manifest.id) / name)


async def pull_snapshot(request: web.Request) -> web.Response:
    body = await _body(request)
    source, snapshot_id = body.get("source"), body.get("snapshot")
    if not isinstance(source, str) or not isinstance(snapshot_id, str):
        return error(400, "give 'source' (an agent URL) and 'snapshot' (an id)", "bad_request")
    manager = request.app[MANAGER]
    token = body.get("token") if isinstance(body.get("token"), str) else None
    manifest = await asyncio.to_thread(
        pull.pull, manager.config.store, source, snapshot_id, token, manager.digests
    )
    return web.json_response(_snapshot_json(manifest), status=201)


async def create_replicas(request: web.Request) -> web.Response:
    body = await _body(request)
    given, count = body.get("snapshots", body.get("snapshot")), body.get("count", 1)
    snapshots = [given] if isinstance(given, str) else given
    if (
        not isinstance(snapshots, list)
        or not snapshots
        or not all(isinstance(s, str) for s in snapshots)
        or not isinstance(count, int)
        or count < 1
    ):
        return error(
            400,
            "give 'snapshot' (an id) or 'snapshots' (ids, the first that fits this host is "
            "restored) and 'count' (>= 1)",
            "bad_request",
        )
    started = await request.app[MANAGER].restore(snapshots, count)
    return web.json_response({"replicas": [r.to_json() for r in started]}, status=202)


async def list_replicas(request: web.Request) -> web.Response:
    replicas = request.app[MANAGER].replicas.values()
    return web.json_response({"replicas": [r.to_json() for r in replicas]})


async def get_replica(request: web.Request) -> web.Response:
    replica = request.app[MANAGER].get(request.match_info["id"])
    if request.query.get("wait") == "ready":
        try:
            timeout = min(float(request.query.get("timeout", "60")), MAX_WAIT_S)
        except ValueError:
            return error(400, "timeout must be a number of seconds", "bad_request")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while replica.state == "restoring":
                    replica.changed.clear()  # no await since the check: nothing set it between
                    await replica.changed.wait()
    return web.json_response(replica.to_json())


async def delete_replica(request: web.Request) -> web.Response:
    replica = await request.app[MANAGER].stop(request.match_info["id"])
    return web.json_response(replica.to_json())


def make_app(config: AgentConfig, token: str) -> web.Application:
    app = web.Application(middlewares=[authenticate], client_max_size=1 << 20)
    manager = ReplicaManager(config)
    app[MANAGER] = manager
    app[TOKEN] = token
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/resources", get_resources)
    app.router.add_get("/v1/snapshots", list_snapshots)
    app.router.add_post("/v1/snapshots/pull", pull_snapshot)
    app.router.add_get("/v1/snapshots/{id}", get_snapshot)
    app.router.add_get("/v1/snapshots/{id}/files/{name:.+}", get_snapshot_file)
    app.router.add_post("/v1/replicas", create_replicas)
    app.router.add_get("/v1/replicas", list_replicas)
    app.router.add_get("/v1/replicas/{id}", get_replica)
    app.router.add_delete("/v1/replicas/{id}", delete_replica)

    async def lifecycle(app: web.Application) -> Any:
        await manager.start()
        yield
        await manager.close()

    app.cleanup_ctx.append(lifecycle)
    return app


async def serve(config: AgentConfig, token: str, host: str, port: int) -> None:
    """Run the agent until SIGINT/SIGTERM; every replica is stopped on the way out."""
    become_subreaper()
    runner = web.AppRunner(make_app(config, token), access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {host}:{port} ({exc.strerror}); pass another --listen"
            ) from exc
        logger.info("agent %s listening on http://%s:%d", config.name, host, port)
        await stop.wait()
        logger.info("stopping: every replica of this agent goes down")
    finally:
        await runner.cleanup()
