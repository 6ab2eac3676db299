"""The router's request path against in-process fakes: an agent and an engine on 127.0.0.1.

Each test runs its own event loop (asyncio.run) with a deadline, and tears every server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import pytest

from fastboot.buffer.agents import AgentEndpoint
from fastboot.router.app import Router
from fastboot.router.config import ModelConfig, RouterConfig
from fastboot.router.testing import FakeAgent, FakeEngine, completion_body
from fastboot.serve import free_port

MODEL = "m"


def run(coro: Coroutine[Any, Any, None], deadline_s: float = 30.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, deadline_s)

    asyncio.run(bounded())


async def until(predicate: Callable[[], bool], what: str, deadline_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        await asyncio.sleep(0.005)


@dataclass
class Fleet:
    engine: FakeEngine
    agent: FakeAgent
    router: Router
    http: aiohttp.ClientSession

    def metric(self, name: str, **labels: str) -> float:
        value = self.router.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def post(
        self, body: bytes | dict[str, Any], path: str = "/v1/completions", **kw: Any
    ) -> tuple[int, dict[str, Any], Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.http.post(path, data=data, **kw) as response:
            raw = await response.read()
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = raw
            return response.status, dict(response.headers), doc


@contextlib.asynccontextmanager
async def fleet(
    model: dict[str, Any] | None = None,
    router: dict[str, Any] | None = None,
    agent: dict[str, Any] | None = None,
    engine: FakeEngine | None = None,
    extra_agents: tuple[AgentEndpoint, ...] = (),
) -> AsyncIterator[Fleet]:
    eng = engine or FakeEngine()
    await eng.start()
    fake = FakeAgent(lambda snapshot: eng.url, **(agent or {}))
    await fake.start()
    config = RouterConfig(
        models=(ModelConfig(name=MODEL, snapshot="snap", **(model or {})),),
        agents=(*extra_agents, AgentEndpoint(fake.url, token=fake.token, name="fake")),
        port=0,
        **(router or {}),
    )
    r = Router(config)
    http = None
    try:
        await r.start()
        http = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{r.port}")
        yield Fleet(eng, fake, r, http)
    finally:
        if http is not None:
            await http.close()
        await r.stop()
        await fake.stop()
        await eng.stop()


def dead_agent() -> AgentEndpoint:
    """An agent address where nothing listens."""
    return AgentEndpoint(f"http://127.0.0.1:{free_port()}", token="x", name="dead")


# --- routing and scale from zero -------------------------------------------------------------


def test_first_requests_at_zero_merge_into_one_placement_and_record_one_cold_start() -> None:
    async def main() -> None:
        async with fleet(model={"concurrency": 2}, agent={"ready_after_s": 0.2}) as f:
            f.engine.delay_s = 0.05
            assert f.router.pools[MODEL].replicas == {}
            results = await asyncio.gather(*(f.post(completion_body(MODEL)) for _ in range(5)))
            assert [status for status, _, _ in results] == [200] * 5
            assert all(doc["served_by"] == "engine" for _, _, doc in results)
            assert len(f.agent.posts) == 1, f.agent.posts
            assert f.agent.posts[0] == {"snapshot": "snap", "count": 1}
            # Released up to the replica's cap, never more at once.
            assert f.engine.peak == 2
            assert f.metric("router_cold_start_seconds_count", model=MODEL) == 1
            assert f.metric("router_cold_start_seconds_sum", model=MODEL) >= 0.2
            assert f.metric("router_replica_boot_seconds_count", model=MODEL, phase="total") == 1
            assert f.metric("router_queue_depth", model=MODEL) == 0
            assert f.metric("router_requests_total", model=MODEL, code="200") == 5

    run(main())


def test_served_model_name_is_rewritten_only_when_it_differs() -> None:
    async def main() -> None:
        async with fleet(agent={"model": "/models/tiny"}) as f:
            status, _, _ = await f.post(completion_body(MODEL))
            assert status == 200
            assert f.engine.requests[-1][1]["model"] == "/models/tiny"
        async with fleet(agent={"model": MODEL}) as f:
            body = completion_body(MODEL) + b"  "  # trailing bytes survive: passed verbatim
            status, _, _ = await f.post(body)
            assert status == 200 and f.engine.requests[-1][1]["model"] == MODEL

    run(main())


def test_models_lists_every_configured_model_while_scaled_to_zero() -> None:
    async def main() -> None:
        async with fleet() as f:
            async with f.http.get("/v1/models") as response:
                doc = await response.json()
            assert [m["id"] for m in doc["data"]] == [MODEL]
            async with f.http.get(f"/v1/models/{MODEL}") as response:
                assert response.status == 200
            async with f.http.get("/health") as response:
                health = await response.json()
            assert health["models"][MODEL]["replicas"] == 0
            assert f.agent.posts == []  # listing models starts nothing

    run(main())


def test_sse_stream_passes_through_byte_identical() -> None:
    async def main() -> None:
        engine = FakeEngine(chunk_delay_s=0.01)
        async with fleet(engine=engine) as f:
            async with f.http.post(
                "/v1/completions", data=completion_body(MODEL, stream=True)
            ) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/event-stream")
                received = await response.read()
            assert received == b"".join(engine.chunks)
            assert f.metric("router_ttfb_seconds_count", model=MODEL) == 1

    run(main())


def test_chat_and_embeddings_are_routed() -> None:
    async def main() -> None:
        async with fleet() as f:
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            status, _, _ = await f.post(chat, path="/v1/chat/completions")
            assert status == 200
            status, _, _ = await f.post({"model": MODEL, "input": "x"}, path="/v1/embeddings")
            assert status == 200
            assert [p for p, _ in f.engine.requests] == ["/v1/chat/completions", "/v1/embeddings"]

    run(main())


def test_adopts_ready_replicas_the_agent_already_runs() -> None:
    async def main() -> None:
        engine = FakeEngine()
        await engine.start()
        agent = FakeAgent(lambda s: engine.url)
        await agent.start()
        agent.add_replica("snap-full-id", state="ready")
        config = RouterConfig(
            models=(ModelConfig(name=MODEL, snapshot="snap"),),
            agents=(AgentEndpoint(agent.url, token=agent.token),),
            port=0,
        )
        router = Router(config)
        try:
            await router.start()
            assert len(router.pools[MODEL].ready()) == 1
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"http://127.0.0.1:{router.port}/v1/completions", data=completion_body(MODEL)
                ) as response,
            ):
                assert response.status == 200
            assert agent.posts == []
        finally:
            await router.stop()
            await agent.stop()
            await engine.stop()

    run(main())


# --- bad input -------------------------------------------------------------------------------


def test_every_client_error_is_openai_style() -> None:
    async def main() -> None:
        async with fleet(router={"max_body_bytes": 1024}) as f:
            cases: list[tuple[bytes, int, str]] = [
                (b"{not json", 400, "invalid_json"),
                (b'["a list"]', 400, "invalid_request"),
                (b'{"prompt": "no model"}', 400, "invalid_request"),
                (completion_body("nope"), 404, "model_not_found"),
                (completion_body(MODEL, prompt="x" * 2000), 413, "body_too_large"),
            ]
            for body, status, code in cases:
                got, _, doc = await f.post(body)
                assert (got, doc["error"]["code"]) == (status, code), doc
                assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
            assert f.engine.requests == [] and f.agent.posts == []

    run(main())


def test_api_keys_are_required_when_configured_and_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "sk-very-secret-key"

    async def main() -> None:
        async with fleet(router={"api_keys": frozenset({secret})}) as f:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": secret}):
                status, _, doc = await f.post(completion_body(MODEL), headers=headers)
                assert status == 401 and doc["error"]["code"] == "invalid_api_key"
            async with f.http.get("/v1/models") as response:
                assert response.status == 401
            ok = {"Authorization": f"Bearer {secret}"}
            status, _, _ = await f.post(completion_body(MODEL), headers=ok)
            assert status == 200
            async with f.http.get("/health") as response:
                assert response.status == 200  # health and metrics need no key
            assert secret not in repr(f.router.config)

    with caplog.at_level(logging.DEBUG):
        run(main())
    assert caplog.records, "expected the router to log its lifecycle"
    assert all(secret not in r.getMessage() for r in caplog.records)


# --- queueing, deadlines, placement faults ---------------------------------------------------


def test_queue_beyond_its_bound_is_429_with_retry_after() -> None:
    async def main() -> None:
        async with fleet(model={"concurrency": 1, "queue_max": 1}) as f:
            f.engine.delay_s = 0.3
            first = asyncio.ensure_future(f.post(completion_body(MODEL)))
            await until(lambda: f.engine.active == 1, "the first request to reach the engine")
            second = asyncio.ensure_future(f.post(completion_body(MODEL)))
            await until(lambda: len(f.router.pools[MODEL].queue) == 1, "the second to queue")
            status, headers, doc = await f.post(completion_body(MODEL))
            assert status == 429 and doc["error"]["code"] == "queue_full"
            assert int(headers["Retry-After"]) >= 1
            assert [(await first)[0], (await second)[0]] == [200, 200]
            assert f.metric("router_queue_rejections_total", model=MODEL, reason="full") == 1
            # The first waited for the boot, the second for the slot.
            assert f.metric("router_queue_wait_seconds_count", model=MODEL) == 2

    run(main())


def test_no_agent_reachable_waits_for_the_deadline_then_503_with_the_reason() -> None:
    async def main() -> None:
        eng = FakeEngine()
        config = RouterConfig(
            models=(ModelConfig(name=MODEL, snapshot="snap", queue_deadline_s=0.6),),
            agents=(dead_agent(),),
            port=0,
        )
        router = Router(config)
        try:
            await router.start()
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"http://127.0.0.1:{router.port}/v1/completions", data=completion_body(MODEL)
                ) as response,
            ):
                doc = await response.json()
                assert response.status == 503
            assert loop.time() - started >= 0.6
            assert doc["error"]["code"] == "no_replica"
            assert "dead: unreachable" in doc["error"]["message"], doc
            value = router.metrics.registry.get_sample_value(
                "router_queue_rejections_total", {"model": MODEL, "reason": "deadline"}
            )
            assert value == 1
        finally:
            await router.stop()
            await eng.stop()

    run(main())


def test_placement_skips_unreachable_and_full_agents() -> None:
    async def main() -> None:
        async with fleet(agent={"refuse": [409]}, extra_agents=(dead_agent(),)) as f:
            status, _, _ = await f.post(completion_body(MODEL))
            assert status == 200
            # The fake refused its first POST with 409; the placement retried and got one.
            assert len(f.agent.posts) == 2
            assert f.metric("router_placement_errors_total", agent="dead", reason="unreachable")
            assert f.metric("router_placement_errors_total", agent="fake", reason="full") == 1

    run(main())


def test_failed_restore_is_replaced() -> None:
    async def main() -> None:
        async with fleet(agent={"ready_after_s": None}) as f:
            request = asyncio.ensure_future(f.post(completion_body(MODEL)))
            await until(lambda: len(f.agent.replicas) == 1, "the first placement")
            f.agent.set_state("r1", "failed", "criu restore failed")
            await until(lambda: len(f.agent.replicas) == 2, "a replacement placement")
            f.agent.make_ready("r2")
            status, _, _ = await request
            assert status == 200
            assert f.metric("router_replica_failures_total", model=MODEL, reason="failed") == 1

    run(main())


# --- faults during a request -----------------------------------------------------------------


def test_client_disconnect_cancels_the_upstream_request() -> None:
    async def main() -> None:
        engine = FakeEngine(chunk_delay_s=0.5, chunks=[b"data: 1\n\n"] * 20)
        async with fleet(engine=engine) as f:
            response = await f.http.post(
                "/v1/completions", data=completion_body(MODEL, stream=True)
            )
            assert response.status == 200
            assert await response.content.readany()
            response.close()  # the client goes away mid-stream
            await until(lambda: engine.cancelled == 1, "the engine to see the disconnect")
            pool = f.router.pools[MODEL]
            await until(lambda: pool.inflight() == 0, "the slot to be released")

    run(main())


def test_disconnect_while_queued_leaves_the_queue() -> None:
    async def main() -> None:
        async with fleet(agent={"ready_after_s": None}) as f:
            task = asyncio.ensure_future(f.post(completion_body(MODEL)))
            pool = f.router.pools[MODEL]
            await until(lambda: len(pool.queue) == 1, "the request to queue")
            task.cancel()
            await until(lambda: len(pool.queue) == 0, "the queue to drop it")

    run(main())


def test_replica_crash_mid_stream_ends_the_stream_cleanly_and_replaces_the_replica() -> None:
    async def main() -> None:
        engine = FakeEngine(crash_after=2, crashes=1)
        async with fleet(engine=engine) as f:
            async with f.http.post(
                "/v1/completions", data=completion_body(MODEL, stream=True)
            ) as response:
                assert response.status == 200
                received = await response.read()
            assert received.startswith(engine.chunks[0] + engine.chunks[1])
            tail = received[len(engine.chunks[0] + engine.chunks[1]) :]
            event = json.loads(tail.decode().strip().removeprefix("data: "))
            assert event["error"]["code"] == "replica_failed"
            await until(lambda: f.agent.deletes == ["r1"], "the crashed replica's DELETE")
            await until(lambda: "r2" in f.agent.replicas, "a replacement placement")
            status, _, _ = await f.post(completion_body(MODEL))
            assert status == 200
            assert set(f.router.pools[MODEL].replicas) == {"r2"}
            assert f.metric("router_replica_failures_total", model=MODEL, reason="crashed") == 1

    run(main())


def test_replica_crash_before_the_answer_is_a_502() -> None:
    async def main() -> None:
        engine = FakeEngine(crash_after=0, crashes=1)
        async with fleet(engine=engine) as f:
            status, _, doc = await f.post(completion_body(MODEL))
            assert status == 502 and doc["error"]["code"] == "replica_failed"
            await until(lambda: f.agent.deletes == ["r1"], "the crashed replica's DELETE")
            status, _, _ = await f.post(completion_body(MODEL))
            assert status == 200

    run(main())


def test_queued_requests_go_to_the_replacement_when_a_replica_refuses_connections() -> None:
    async def main() -> None:
        engine = FakeEngine()
        address = {"url": f"http://127.0.0.1:{free_port()}"}  # nothing listens at first
        await engine.start()
        agent = FakeAgent(lambda s: address["url"], ready_after_s=None)
        await agent.start()
        config = RouterConfig(
            models=(ModelConfig(name=MODEL, snapshot="snap"),),
            agents=(AgentEndpoint(agent.url, token=agent.token),),
            port=0,
        )
        router = Router(config)
        try:
            await router.start()
            pool = router.pools[MODEL]
            task = asyncio.ensure_future(_post(router.port, completion_body(MODEL)))
            await until(lambda: len(agent.replicas) == 1, "the first placement")
            address["url"] = engine.url  # the replacement will be reachable
            agent.make_ready("r1")
            await until(lambda: len(agent.replicas) == 2, "the replacement placement")
            agent.make_ready("r2")
            status = await task
            assert status == 200
            assert agent.deletes == ["r1"] and "r2" in pool.replicas
        finally:
            await router.stop()
            await agent.stop()
            await engine.stop()

    run(main())


async def _post(port: int, body: bytes) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{port}/v1/completions", data=body) as response,
    ):
        await response.read()
        return response.status


def test_first_byte_timeout_is_a_504() -> None:
    async def main() -> None:
        timeouts = replace(RouterConfig().timeouts, first_byte_s=0.2)
        async with fleet(router={"timeouts": timeouts}) as f:
            f.engine.delay_s = 2.0
            status, _, doc = await f.post(completion_body(MODEL))
            assert status == 504 and doc["error"]["code"] == "upstream_timeout"

    run(main())


# --- the controller's ticks ------------------------------------------------------------------


def test_replica_the_agent_reports_dead_is_replaced() -> None:
    async def main() -> None:
        async with fleet(model={"min_replicas": 1}, router={"tick_s": 0.05}) as f:
            pool = f.router.pools[MODEL]
            await until(lambda: len(pool.ready()) == 1, "the min replica")
            f.agent.set_state("r1", "dead", "engine exited with 137")
            await until(
                lambda: [r.id for r in pool.ready()] == ["r2"], "the dead replica's replacement"
            )
            assert f.metric("router_replica_failures_total", model=MODEL, reason="dead") == 1

    run(main())


def test_scales_back_to_zero_after_the_scale_down_delay() -> None:
    async def main() -> None:
        model = {"stable_window_s": 0.2, "panic_window_s": 0.1, "scale_down_delay_s": 0.5}
        async with fleet(model=model, router={"tick_s": 0.05}) as f:
            status, _, _ = await f.post(completion_body(MODEL))
            assert status == 200
            loop = asyncio.get_running_loop()
            served = loop.time()
            pool = f.router.pools[MODEL]
            await until(lambda: f.agent.deletes == ["r1"], "the idle replica's DELETE")
            assert loop.time() - served >= 0.4
            await until(lambda: not pool.replicas, "the pool to be empty")
            async with f.http.get("/v1/models") as response:
                assert [m["id"] for m in (await response.json())["data"]] == [MODEL]
            # And back from zero.
            status, _, _ = await f.post(completion_body(MODEL))
            assert status == 200 and len(f.agent.posts) == 2

    run(main())


def test_metrics_endpoint_exports_the_router_metrics() -> None:
    async def main() -> None:
        async with fleet() as f:
            await f.post(completion_body(MODEL))
            async with f.http.get("/metrics") as response:
                text = await response.text()
            for name in (
                "router_requests_total",
                "router_request_duration_seconds",
                "router_ttfb_seconds",
                "router_queue_depth",
                "router_cold_start_seconds",
                "router_replica_boot_seconds",
                "router_proxy_overhead_seconds",
                "router_replicas",
            ):
                assert name in text, name

    run(main())


def test_a_burst_beyond_the_caps_places_more_replicas_at_once_up_to_max() -> None:
    async def main() -> None:
        model = {"concurrency": 1, "max_replicas": 3}
        async with fleet(model=model, agent={"ready_after_s": 0.2}) as f:
            f.engine.delay_s = 0.2
            results = await asyncio.gather(*(f.post(completion_body(MODEL)) for _ in range(5)))
            assert [status for status, _, _ in results] == [200] * 5
            assert len(f.agent.posts) == 3  # one per request beyond the caps, never above max
            assert f.engine.peak <= 3
            assert len(f.router.pools[MODEL].ready()) == 3

    run(main())


def test_stream_idle_timeout_ends_the_stream_with_an_error_event() -> None:
    async def main() -> None:
        engine = FakeEngine(chunk_delay_s=2.0, chunks=[b"data: 1\n\n", b"data: 2\n\n"])
        timeouts = replace(RouterConfig().timeouts, idle_s=0.2)
        async with fleet(engine=engine, router={"timeouts": timeouts}) as f:
            async with f.http.post(
                "/v1/completions", data=completion_body(MODEL, stream=True)
            ) as response:
                received = await response.read()
            assert received.startswith(b"data: 1\n\n")
            event = json.loads(received[len(b"data: 1\n\n") :].decode().removeprefix("data: "))
            assert event["error"]["code"] == "upstream_timeout"
            await until(lambda: engine.cancelled == 1, "the engine to see the disconnect")

    run(main())


def test_scale_down_drains_a_busy_replica_before_deleting_it() -> None:
    async def main() -> None:
        model = {"min_replicas": 1, "max_replicas": 2, "concurrency": 1, "target_utilization": 1.0}
        async with fleet(model=model, router={"tick_s": 0.05}) as f:
            pool = f.router.pools[MODEL]
            await until(lambda: len(pool.ready()) == 1, "the min replica")
            f.engine.delay_s = 0.5
            slow = asyncio.ensure_future(f.post(completion_body(MODEL)))
            await until(lambda: f.engine.active == 1, "the request to start")
            (replica,) = pool.ready()
            f.router.controller._scale_down(pool, 1)
            assert replica.state == "draining" and f.agent.deletes == []
            status, _, _ = await slow
            assert status == 200  # the drained replica finished its request
            await until(lambda: f.agent.deletes == [replica.id], "the DELETE after draining")
            # Demand (1 in flight at the cap) and the floor bring a fresh replica back.
            await until(lambda: [r.id for r in pool.ready()] == ["r2"], "a replacement")

    run(main())


def test_client_disconnect_before_the_answer_cancels_the_upstream_request() -> None:
    async def main() -> None:
        async with fleet() as f:
            f.engine.delay_s = 5.0
            task = asyncio.ensure_future(f.post(completion_body(MODEL)))
            await until(lambda: f.engine.active == 1, "the request to reach the engine")
            task.cancel()  # closes the client's connection to the router
            await until(lambda: f.engine.cancelled == 1, "the engine to see the disconnect")
            pool = f.router.pools[MODEL]
            await until(lambda: pool.inflight() == 0, "the slot to be released")
            await until(
                lambda: f.metric("router_requests_total", model=MODEL, code="499") == 1,
                "the request to be counted as closed by the client",
            )

    run(main())
