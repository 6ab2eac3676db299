"""A real engine server as a child process, for integration tests.

Starts the command in its own session (so the whole tree can be signalled), sends its output to
a log file, polls readiness with a deadline (never sleep-and-hope), shows the log tail when
anything fails, and always stops and reaps the whole process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def http_get_json(url: str, timeout: float = 5.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


class EngineProcess:
    """A running server child; `url` is its base URL (http://127.0.0.1:PORT)."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log

    def wait_ready(self, deadline_s: float) -> float:
        """Poll /health then /v1/models until both answer; returns seconds waited."""
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode} before it was ready; "
                    f"log {self.log}:\n{log_tail(self.log)}"
                )
            if self._answers():
                return time.monotonic() - start
            if time.monotonic() - start > deadline_s:
                raise AssertionError(
                    f"server not ready after {deadline_s:.0f} s; log {self.log}:\n"
                    f"{log_tail(self.log)}"
                )
            time.sleep(0.5)

    def _answers(self) -> bool:
        """True once /health is 200 and /v1/models lists a model."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                if response.status != 200:
                    return False
            models = http_get_json(self.url + "/v1/models")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        return isinstance(models, dict) and bool(models.get("data"))

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the session, SIGKILL what is left after `grace_s`, reap."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        # Children may outlive the leader: kill the whole group regardless.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@contextlib.contextmanager
def engine_process(
    argv: Sequence[str],
    port: int,
    log: Path,
    env: Mapping[str, str] | None = None,
    ready_deadline_s: float = 600.0,
) -> Iterator[EngineProcess]:
    """Start `argv`, wait until it serves on 127.0.0.1:`port`, yield it, always stop it."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    server = EngineProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        server.wait_ready(ready_deadline_s)
        yield server
    finally:
        server.stop()
