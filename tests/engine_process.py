"""A real engine server as a child process, for integration tests.

Starts the command in its own session (so the whole tree can be signalled), sends its output to
a log file, polls readiness with a deadline (never sleep-and-hope), shows the log tail when
anything fails, and always stops and reaps the whole process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from fastboot.serve import free_port

__all__ = [
    "RESTORED",
    "EngineProcess",
    "FastbootRun",
    "engine_process",
    "free_port",
    "process_states",
    "processes_mentioning",
    "serving",
]

#: fastboot's log line for a restore that passed its oracle: id, seconds, cold boot seconds.
RESTORED = r"restored snapshot (\w+) in ([\d.]+) s; cold boot was ([\d.]+) s"


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

    def __init__(
        self, proc: subprocess.Popen[bytes], url: str, log: Path, rpc_dir: Path | None = None
    ) -> None:
        self.proc = proc
        self.url = url
        self.log = log
        self.rpc_dir = rpc_dir
        """Where a vLLM child binds its ZMQ ipc sockets (removed when it stops)."""

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
    """Start `argv`, wait until it serves on 127.0.0.1:`port`, yield it, always stop it.
    vLLM binds its ZMQ ipc sockets in a directory of this run's own (VLLM_RPC_BASE_PATH), removed
    afterwards: in its default, /tmp, every stopped server leaves them behind."""
    rpc_dir = Path(tempfile.mkdtemp(prefix="vllm-rpc-"))
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "VLLM_RPC_BASE_PATH": str(rpc_dir), **(env or {})},
                start_new_session=True,
            )
        server = EngineProcess(proc, f"http://127.0.0.1:{port}", log, rpc_dir)
        try:
            server.wait_ready(ready_deadline_s)
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(rpc_dir, ignore_errors=True)


def processes_mentioning(needle: str) -> list[str]:
    """'PID CMDLINE' of every live, non-zombie process whose command line contains needle."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in cmdline and state != "Z":
            found.append(f"{entry} {cmdline.strip()}")
    return found


def process_states(pids: Sequence[int]) -> str:
    """State, kernel wait channel and threads of each pid and its descendants, for a failure
    message about a process that will not go away."""
    lines, todo = [], [str(p) for p in pids]
    while todo:
        pid = todo.pop()
        base = Path(f"/proc/{pid}")
        try:
            state = (base / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (base / "wchan").read_text()
            kids = [
                kid
                for task in (base / "task").iterdir()
                for kid in (task / "children").read_text().split()
            ]
            threads = len(list((base / "task").iterdir()))
        except OSError as exc:
            lines.append(f"{pid}: {exc.strerror}")
            continue
        lines.append(f"{pid}: state {state}, wchan {wchan or '-'}, {threads} threads, kids {kids}")
        todo += kids
    return "\n".join(lines)


class FastbootRun:
    """`fastboot serve ...` as a child, its output in a log file."""

    def __init__(self, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None):
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fastboot", "serve", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def fastboot_lines(self) -> list[str]:
        return [line for line in self.text().splitlines() if " fastboot " in line]

    def wait_for(self, pattern: str, deadline_s: float) -> re.Match[str]:
        """The first fastboot log line matching pattern; fails with the log if it never comes."""
        start = time.monotonic()
        regex = re.compile(pattern)
        while True:
            for line in self.fastboot_lines():
                if match := regex.search(line):
                    return match
            if self.proc.poll() is not None and time.monotonic() - start > 1:
                # One more look: the line may have been written just before the exit.
                for line in self.fastboot_lines():
                    if match := regex.search(line):
                        return match
                raise AssertionError(
                    f"fastboot exited ({self.proc.returncode}) without {pattern!r}; log:\n"
                    f"{log_tail(self.log, 80)}"
                )
            if time.monotonic() - start > deadline_s:
                raise AssertionError(
                    f"no {pattern!r} within {deadline_s:.0f} s; log:\n{log_tail(self.log, 80)}"
                )
            time.sleep(0.2)

    def interrupt(self, sig: int = signal.SIGINT, deadline_s: float = 60) -> int:
        """Send sig to fastboot alone (as Ctrl-C would, to the foreground process) and wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(deadline_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"fastboot did not exit after {sig}; log:\n{log_tail(self.log)}"
            ) from None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@contextlib.contextmanager
def serving(run: FastbootRun, pattern: str, deadline_s: float) -> Iterator[FastbootRun]:
    """run, once its log has a line matching pattern; stopped on the way out if still running
    (tests that stop it themselves check how it stopped). Ctrl-C first, so fastboot stops its
    engine too (a restored engine runs in its own session, out of reach of killpg), then
    SIGKILL if it does not exit."""
    try:
        run.wait_for(pattern, deadline_s)
        yield run
    finally:
        if run.proc.poll() is None:
            with contextlib.suppress(AssertionError):  # interrupt() has killed it by then
                run.interrupt(signal.SIGINT, deadline_s=30)
