"""The remote tier: plain HTTP GETs (whole objects, or one byte range) against a static server.

Blocking on purpose: callers run it in worker threads (`trio.to_thread`), where http.client reads
straight into a preallocated buffer with the GIL released, which is faster than an async client
in Python for multi-MiB bodies. Connections are kept alive in a small pool.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import queue
import socket
import time
import urllib.parse

from fastboot.errors import ImageNotFoundError, RemoteError, UsageError

logger = logging.getLogger(__name__)


class RemoteClient:
    """GETs under one base URL (http:// only; put TLS in front with a CDN or proxy)."""

    def __init__(self, base_url: str, timeout: float = 10.0, pool_size: int = 16) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise UsageError(
                f"remote {base_url!r} is not an http:// URL; give the base URL of a static "
                "server that serves the image store (e.g. http://127.0.0.1:8080/images)"
            )
        self.base_url = base_url.rstrip("/")
        self._host = parsed.hostname
        self._port = parsed.port or 80
        self._prefix = parsed.path.rstrip("/")
        self.timeout = timeout
        self._pool: queue.LifoQueue[http.client.HTTPConnection] = queue.LifoQueue(pool_size)

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    def _connection(self) -> http.client.HTTPConnection:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def _release(self, conn: http.client.HTTPConnection) -> None:
        try:
            self._pool.put_nowait(conn)
        except queue.Full:
            conn.close()

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return

    def get(self, path: str, *, missing_ok: bool = False) -> bytes | bytearray | None:
        """The whole object at `path`; None if it is absent and `missing_ok`."""
        data = self._request(path, None, missing_ok)
        assert not isinstance(data, memoryview)  # only ranges are read into a given buffer
        return data

    def get_range(
        self, path: str, offset: int, length: int, into: memoryview | None = None
    ) -> bytes | bytearray | memoryview:
        """Exactly `length` bytes of `path` from `offset` (one ranged GET), read into `into`
        (`length` bytes) if given."""
        data = self._request(path, (offset, length), False, into)
        assert data is not None
        return data

    def _request(
        self,
        path: str,
        span: tuple[int, int] | None,
        missing_ok: bool,
        into: memoryview | None = None,
    ) -> bytes | bytearray | memoryview | None:
        target = f"{self._prefix}/{path}"
        headers = {"Accept-Encoding": "identity"}
        if span is not None:
            headers["Range"] = f"bytes={span[0]}-{span[0] + span[1] - 1}"
        what = f"GET {self.url(path)}" + (f" bytes {span[0]}+{span[1]}" if span else "")
        # One retry: a kept-alive connection the server closed fails on first use.
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
                status = response.status
                if status == 404 and span is None:
                    response.read()
                    self._release(conn)
                    if missing_ok:
                        return None
                    raise ImageNotFoundError(
                        f"{self.url(path)} does not exist on the remote; check the image name "
                        "and that it was pushed there (`fastboot image push NAME --to DIR`)"
                    )
                expected = 206 if span is not None else 200
                if status != expected:
                    body = response.read(200)
                    conn.close()
                    raise RemoteError(
                        f"{what} answered {status} {response.reason} (expected {expected}): "
                        f"{body[:120]!r}; check that the remote serves the image store "
                        "unchanged (byte ranges on)"
                    )
                if span is not None:
                    data: bytes | bytearray | memoryview = _read_exactly(
                        response, into if into is not None else memoryview(bytearray(span[1]))
                    )
                else:
                    data = response.read()
                if response.will_close:
                    conn.close()
                else:
                    self._release(conn)
                return data
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                stale = isinstance(
                    exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
                )
                if attempt == 1 and stale:
                    continue
                raise RemoteError(
                    f"{what} failed: {exc or type(exc).__name__}; is the remote up and "
                    "reachable? Cached data is still served; uncached reads fail until it is back"
                ) from exc
        raise AssertionError("unreachable")


def _read_exactly(response: http.client.HTTPResponse, view: memoryview) -> memoryview:
    length = len(view)
    got = 0
    while got < length:
        n = response.readinto(view[got:])
        if not n:
            raise RemoteError(
                f"the remote closed the connection after {got} of {length} bytes; "
                "retry, and check the server's logs"
            )
        got += n
    return view


def wait_reachable(base_url: str, deadline_s: float) -> None:
    """Block until something accepts TCP connections at base_url's host:port (tests, tools)."""
    parsed = urllib.parse.urlsplit(base_url)
    end = time.monotonic() + deadline_s
    while True:
        with contextlib.suppress(OSError):
            socket.create_connection((parsed.hostname, parsed.port or 80), timeout=1).close()
            return
        if time.monotonic() > end:
            raise RemoteError(f"nothing listens at {base_url} after {deadline_s:.0f} s")
        time.sleep(0.05)
