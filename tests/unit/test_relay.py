"""The relay of `fastboot serve --fastboot-isolated`: bytes both ways, gated until start()."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from fastboot.errors import UsageError
from fastboot.host.relay import Relay
from fastboot.serve import free_port


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data.upper())


@pytest.fixture
def echo() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_bytes_pass_both_ways_only_after_start(echo: int) -> None:
    relay = Relay("127.0.0.1", free_port(), "127.0.0.1", echo)
    relay.bind()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as early:
            early.sendall(b"held")
            early.settimeout(0.3)
            with pytest.raises(TimeoutError):
                early.recv(16)  # queued in the backlog: nothing is forwarded before start()
            relay.start()
            early.settimeout(5)
            assert early.recv(16) == b"HELD"
        big = b"x" * (1 << 20)
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as conn:
            conn.sendall(big)
            got = b""
            while len(got) < len(big):
                got += conn.recv(1 << 16)
            assert got == big.upper()
    finally:
        relay.stop()


def test_busy_port_is_a_usage_error(echo: int) -> None:
    with pytest.raises(UsageError, match=f"port {echo} on 127.0.0.1 is busy"):
        Relay("127.0.0.1", echo, "127.0.0.1", echo).bind()
