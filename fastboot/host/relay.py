"""A TCP relay from the address the user asked for to an engine inside its own namespace.

`fastboot serve --fastboot-isolated` runs the engine as a replica (its own network namespace,
listening at the namespace's address); the relay publishes it on the user's --host/--port. It
copies bytes both ways without parsing them (HTTP, SSE and keep-alive pass through unchanged)
and closes both sides when either closes. It runs its own asyncio loop on a thread, so the
serve process keeps its blocking supervisor loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading

from fastboot.errors import UsageError

logger = logging.getLogger(__name__)

CHUNK = 1 << 16


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, RuntimeError, OSError):
            writer.close()


class Relay:
    """Listen on (host, port); forward each connection to (target_host, target_port)."""

    def __init__(self, host: str, port: int, target_host: str, target_port: int) -> None:
        self.host, self.port = host, port
        self.target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError as exc:
            logger.warning("relay: engine at %s:%d unreachable: %s", *self.target, exc)
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    def bind(self) -> None:
        """Take the port now (a busy port is a UsageError here, before any boot). Connections
        wait in the kernel's backlog until start(): nothing reaches an engine that has not
        passed its checks."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            raise UsageError(
                f"port {self.port} on {self.host} is busy ({exc.strerror}); "
                "stop what listens there or pass another --port"
            ) from exc
        sock.setblocking(False)
        self._sock = sock

    def start(self) -> None:
        """Accept and forward connections (bind() first), on a thread."""
        if self._sock is None:
            self.bind()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, sock=self._sock)
        )
        self._thread.start()
        logger.debug("relay %s:%d -> %s:%d", self.host, self.port, *self.target)

    def stop(self) -> None:
        if self._server is None:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self._loop.close()
            return
        server = self._server

        async def close() -> None:
            server.close()
            await server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._server = None
