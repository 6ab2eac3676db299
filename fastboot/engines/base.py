"""The engine adapter protocol, and what every adapter shares (HTTP, the oracle's prompt).

An adapter is one module of fastboot.engines that satisfies `Engine` (mypy checks each one where
fastboot.engines registers it). It is all the rest of fastboot knows of an engine: how to launch
it from `vllm serve`-style flags, what in the environment changes it, when it is ready, how to
warm it up, and the oracle a restored copy must reproduce before it serves.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fastboot.errors import FastbootError

#: The oracle: a fixed greedy request whose token ids a restored engine must reproduce.
ORACLE_PROMPT = "fastboot oracle: the quick brown fox jumps over the lazy dog"
ORACLE_MAX_TOKENS = 8
#: Prompts of several lengths: each new shape is compiled on first use, so a snapshot taken
#: after these restores an engine that compiles nothing on the first requests.
WARMUP_PROMPTS = ("hi", "a warm-up request " * 8, "a longer warm-up request, " * 40)


class EngineError(FastbootError):
    """The engine failed to start, answer, or reproduce its oracle."""


class Engine(Protocol):
    """What fastboot needs of an engine (an adapter module implements it)."""

    NAME: str
    """The snapshot key's engine ("vllm", "sglang")."""
    ENV_PREFIXES: tuple[str, ...]
    """Environment variables with these prefixes change the engine: part of the snapshot key."""
    HAS_PLUGIN: bool
    """Whether fastboot's engine-side plugin (fastboot_patches) loads in its processes."""
    INSTALL_HINT: str
    """What to install when the engine is missing."""
    CPU_FLOOR: str
    """The lowest x86-64 level its code runs at (`--fastboot-cpu-baseline` may not go below)."""

    def options(self) -> dict[str, Any]:
        """What the snapshot key records to build this adapter again ({} for an adapter with
        nothing to configure; see fastboot.engines.get)."""
        ...

    def key_paths(self, model: str, engine_argv: list[str]) -> list[str]:
        """Local files and directories besides MODEL that the engine's flags name and whose
        content the snapshot depends on (keyed by content); [] where MODEL says it all."""
        ...

    def version(self, site_packages: list[str] | None = None) -> str:
        """The installed engine's version (this environment's, or the one in site_packages);
        DependencyError naming INSTALL_HINT if there is none."""
        ...

    def command(self, model: str, engine_argv: list[str], python: Path | None = None) -> list[str]:
        """The engine's argv for `vllm serve MODEL engine_argv...` (translated where the engine
        speaks other flags); python: run by another environment's interpreter."""
        ...

    def socket_env(self, directory: Path) -> dict[str, str]:
        """Environment that makes the engine bind its local (unix) sockets under directory, so
        a restore finds the paths it was dumped with and replicas do not share them."""
        ...

    def wait_ready(self, url: str, deadline_s: float, alive: Callable[[], bool]) -> str:
        """Poll until the engine serves; the served model name. EngineError if it exits first
        or deadline_s passes."""
        ...

    def warm_up(self, url: str, model: str) -> None:
        """Requests that make it compile (and capture) what serving needs, before the dump."""
        ...

    def oracle(self, url: str, model: str) -> dict[str, Any]:
        """Run the fixed greedy request: {prompt, max_tokens, token_ids, text}."""
        ...

    def check_oracle(self, url: str, model: str, recorded: dict[str, Any]) -> None:
        """The engine at url reproduces the recorded oracle; EngineError otherwise."""
        ...

    def doctor(self) -> tuple[bool, str, str]:
        """For `fastboot doctor`: (usable, what is installed, the command that fixes it)."""
        ...

    def quiesce(self, url: str) -> None:
        """What the engine itself must release before a dump (after warm-up and the oracle)."""
        ...

    def resume(self, url: str) -> None:
        """Take back what quiesce released, after a restore and before the oracle check."""
        ...


def base_url(host: str | None, port: int | None) -> str:
    """Where fastboot reaches an engine that listens on host:port (a wildcard: loopback)."""
    if host in (None, "", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port or 8000}"


def request_json(url: str, body: dict[str, Any] | None = None, timeout: float = 120) -> Any:
    """GET (body None) or POST JSON to an engine; the decoded answer. With VLLM_API_KEY set in
    fastboot's environment it is sent as the bearer token (`vllm serve` reads the same
    variable as its --api-key)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if key := os.environ.get("VLLM_API_KEY"):
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def wait_openai_ready(url: str, deadline_s: float, alive: Callable[[], bool]) -> str:
    """Poll /health then /v1/models until they answer; returns the served model name.

    Raises EngineError if the engine exits first or the deadline passes.
    """
    start = time.monotonic()
    while True:
        if not alive():
            raise EngineError("the engine exited before it was ready")
        try:
            request_json(url + "/health", timeout=2)
            models = request_json(url + "/v1/models", timeout=5)
            return str(models["data"][0]["id"])
        except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError):
            pass  # not up yet, or not answering the way a ready server does
        if time.monotonic() - start > deadline_s:
            raise EngineError(f"the engine did not answer on {url} within {deadline_s:.0f} s")
        time.sleep(0.2)


def compare_token_ids(recorded: dict[str, Any], got: list[int]) -> None:
    """EngineError unless got is the recorded oracle's token ids."""
    if got != recorded["token_ids"]:
        raise EngineError(f"oracle mismatch: expected token ids {recorded['token_ids']}, got {got}")
