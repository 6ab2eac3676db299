"""vLLM sleep-mode hooks against a fake vLLM dev API (real HTTP on loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest

from fastboot.engines import EngineError, hooks, vllm_sleep
from tests.unit.http_fakes import JsonHandler, running


class FakeVllm(ThreadingHTTPServer):
    dev_mode = True
    sleeping = 0
    lie_about_sleep = False
    requests: list[tuple[str, str, bytes]]


class Handler(JsonHandler):
    server: FakeVllm

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        self.server.requests.append((method, self.path, body))
        path, _, query = self.path.partition("?")
        if not self.server.dev_mode:
            self._answer(404, {"detail": "Not Found"})
        elif (method, path) == ("POST", "/sleep"):
            level = int(query.removeprefix("level="))
            if not self.server.lie_about_sleep:
                self.server.sleeping = level
            self._answer(200, {"status": "sleeping", "level": level})
        elif (method, path) == ("POST", "/wake_up"):
            if not query or query == "tags=kv_cache":
                self.server.sleeping = 0
            self._answer(200, {"status": "awake" if not self.server.sleeping else "sleeping"})
        elif (method, path) == ("GET", "/is_sleeping"):
            self._answer(200, {"is_sleeping": bool(self.server.sleeping)})
        elif (method, path) == ("POST", "/collective_rpc"):
            self._answer(200, {"results": [None]})
        else:
            self._answer(500, {"detail": "unexpected"})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")


@pytest.fixture
def fake() -> Iterator[tuple[FakeVllm, str]]:
    server = FakeVllm(("127.0.0.1", 0), Handler)
    server.requests = []
    with running(server) as url:
        yield server, url


def test_loaded_as_hooks_quiesce_then_resume(fake: tuple[FakeVllm, str]) -> None:
    server, url = fake
    loaded = hooks.load("fastboot.engines.vllm_sleep")
    loaded.quiesce(url)
    assert server.sleeping == 1
    loaded.resume(url)
    assert server.sleeping == 0
    assert [(m, p) for m, p, _ in server.requests] == [
        ("POST", "/sleep?level=1"),
        ("GET", "/is_sleeping"),
        ("POST", "/wake_up"),
        ("GET", "/is_sleeping"),
    ]


def test_level2_wakes_weights_reloads_then_kv(fake: tuple[FakeVllm, str]) -> None:
    server, url = fake
    vllm_sleep.quiesce_level2(url)
    assert server.sleeping == 2
    vllm_sleep.resume_level2(url)
    assert server.sleeping == 0
    posts = [(p, b) for m, p, b in server.requests if m == "POST"]
    assert posts == [
        ("/sleep?level=2", b""),
        ("/wake_up?tags=weights", b""),
        ("/collective_rpc", b'{"method": "reload_weights"}'),
        ("/wake_up?tags=kv_cache", b""),
    ]


def test_without_dev_mode_the_error_says_how_to_start_the_engine(
    fake: tuple[FakeVllm, str],
) -> None:
    server, url = fake
    server.dev_mode = False
    with pytest.raises(EngineError, match=r"VLLM_SERVER_DEV_MODE=1.*--enable-sleep-mode"):
        vllm_sleep.quiesce(url)


def test_an_engine_that_does_not_sleep_is_caught(fake: tuple[FakeVllm, str]) -> None:
    server, url = fake
    server.lie_about_sleep = True
    with pytest.raises(EngineError, match="but is not sleeping"):
        vllm_sleep.quiesce(url)


def test_unreachable_engine_is_an_engine_error() -> None:
    with pytest.raises(EngineError, match="failed"):
        vllm_sleep.resume("http://127.0.0.1:9")


def test_bad_level_is_refused() -> None:
    with pytest.raises(ValueError, match="1 or 2"):
        vllm_sleep.sleep("http://127.0.0.1:9", 0)
