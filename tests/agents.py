"""Real agents and isolated snapshots for integration tests (router, buffer and agent tests).

`create_snapshot` runs `fastboot snapshot create` on the tiny model; `agent_process` starts a
real `fastboot agent` (optionally inside a network namespace the test made, as a second "host"),
polls its health with the token until it answers, and always stops it (SIGTERM: the agent stops
its replicas and removes their namespaces; SIGKILL and a log tail if it does not exit).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import openai

from fastboot.host import netns
from fastboot.host.proctree import tree_pids
from fastboot.models.tiny import cpu_serve_flags
from tests.engine_process import log_tail


def isolated_flags(size: str = "tiny") -> list[str]:
    """cpu_serve_flags without --host: an isolated engine listens on 0.0.0.0 in its netns."""
    flags = cpu_serve_flags(size)
    i = flags.index("--host")
    return flags[:i] + flags[i + 2 :]


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB summed over pid's process tree."""
    rss = pss = 0
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                name, _, value = line.partition(":")
                if name == "Rss":
                    rss += int(value.split()[0])
                elif name == "Pss":
                    pss += int(value.split()[0])
        except OSError:
            continue
    return rss, pss


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by pid's process tree (its live processes)."""
    total = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def create_snapshot(
    model: Path,
    snapshots: Path,
    log: Path,
    timeout_s: float = 900,
    argv: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """`fastboot snapshot create` of model (or of argv, create's whole command line) into
    snapshots, with env added to this process's; returns the snapshot id."""
    command = [sys.executable, "-m", "fastboot", "snapshot", "--dir", str(snapshots), "create"]
    with log.open("wb") as out:
        result = subprocess.run(
            [*command, *(argv if argv is not None else [str(model), *isolated_flags()])],
            stdout=subprocess.PIPE,
            stderr=out,
            timeout=timeout_s,
            check=False,
            env={**os.environ, **(env or {})},
        )
    if result.returncode != 0:
        raise AssertionError(f"snapshot create failed ({result.returncode}):\n{log_tail(log)}")
    return result.stdout.decode().split()[-1]


class Agent:
    """A running agent: its URL and token, and a small JSON client."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, token: str, log: Path) -> None:
        self.proc, self.url, self.token, self.log = proc, url, token, log

    def call(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        """(status, decoded JSON) of one request; token defaults to the agent's own."""
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        given = self.token if token is None else token
        if given:
            request.add_header("Authorization", f"Bearer {given}")
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, document = self.call(method, path, body)
        assert 200 <= status < 300, f"{method} {path}: {status} {document}\n{log_tail(self.log)}"
        return document

    def wait_ready(self, replica_id: str, timeout_s: float = 120) -> dict[str, Any]:
        replica: dict[str, Any] = self.ok(
            "GET", f"/v1/replicas/{replica_id}?wait=ready&timeout={timeout_s}"
        )
        assert replica["state"] == "ready", f"{replica}\n{log_tail(self.log)}"
        return replica

    def wait_healthy(self, deadline_s: float = 60) -> None:
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"agent exited with {self.proc.returncode}:\n{log_tail(self.log)}"
                )
            with contextlib.suppress(OSError):
                if self.call("GET", "/v1/health")[0] == 200:
                    return
            if time.monotonic() - start > deadline_s:
                raise AssertionError(
                    f"agent not healthy after {deadline_s} s:\n{log_tail(self.log)}"
                )
            time.sleep(0.1)

    def stop(self, grace_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError(f"agent ignored SIGTERM:\n{log_tail(self.log)}") from None
        return self.proc.returncode


def start_agent(
    snapshots: Path,
    state: Path,
    log: Path,
    name: str = "t",
    listen_host: str = "127.0.0.1",
    port: int | None = None,
    slots: int = 3,
    prefix: Sequence[str] = (),
    extra: Sequence[str] = (),
    subnet: str | None = None,
    token: str | None = None,
) -> Agent:
    """Start `fastboot agent` (after prefix, e.g. `ip netns exec NS`) and wait until healthy.
    Agents on one host need distinct replica subnets: by default one /24 per agent name."""
    from fastboot.serve import free_port

    token = token or secrets.token_hex(16)
    token_file = state.parent / f"{state.name}.token"
    state.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(token)
    port = port or free_port()
    tag = zlib.crc32(name.encode())
    argv = [
        *prefix,
        sys.executable,
        "-m",
        "fastboot",
        "agent",
        "--listen",
        f"{listen_host}:{port}",
        "--token-file",
        str(token_file),
        "--name",
        name,
        "--snapshot-dir",
        str(snapshots),
        "--state-dir",
        str(state),
        "--slots",
        str(slots),
        "--subnet",
        subnet or f"10.{220 + tag % 30}.{tag % 250}.0/24",
        *extra,
    ]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "FASTBOOT_LOG_LEVEL": "DEBUG"},
        )
    agent = Agent(proc, f"http://{listen_host}:{port}", token, log)
    try:
        agent.wait_healthy()
    except BaseException:
        agent.stop()
        raise
    return agent


@contextlib.contextmanager
def agent_process(snapshots: Path, state: Path, log: Path, **kwargs: Any) -> Iterator[Agent]:
    agent = start_agent(snapshots, state, log, **kwargs)
    try:
        yield agent
    finally:
        agent.stop()


def host_state(prefix: str) -> dict[str, object]:
    """What a test must leave as it found: namespaces, links, mounts of an agent prefix."""
    mounts = Path("/proc/self/mountinfo").read_text().count("\n")
    return {
        "netns": netns.ours(f"fb-{prefix}-"),
        "links": netns.host_links(f"fb{prefix}h"),
        "mounts": mounts,
    }


def complete(replica: dict[str, object], prompt: str = "hello") -> str:
    client = openai.OpenAI(base_url=str(replica["base_url"]), api_key="unused", max_retries=0)
    reply = client.completions.create(
        model=str(replica["model"]), prompt=prompt, max_tokens=4, temperature=0
    )
    return reply.choices[0].text
