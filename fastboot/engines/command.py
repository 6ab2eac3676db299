"""Any OpenAI-compatible server, snapshotted like vLLM (the `command` engine adapter).

    fastboot serve [MODEL] --fastboot-engine command [--host H] [--port P] [--fastboot-...] \\
        -- CMD ARG...

CMD is any server that speaks the OpenAI HTTP API (llama.cpp's `python -m llama_cpp.server`,
`transformers serve`, a FastAPI app). `{host}`, `{port}` and `{model}` in its arguments are
filled from --host (default 127.0.0.1), --port (default 8000) and MODEL, so one command line
serves at the host's address, inside an isolated replica's namespace (0.0.0.0:8000 there) or on
another port. The engine's argv as fastboot keeps it is `[--host H] [--port P] -- CMD ARG...`,
placeholders unfilled: the part before `--` is what a Site may change (IsolatedSite inserts its
own --host/--port there), the part after it is the user's, verbatim.

What fastboot cannot know about an arbitrary server, the user says (CommandOptions): the path
that answers once it is ready (`--fastboot-ready-path`, default /v1/models), how to ask its
version (`--fastboot-engine-version-cmd`) and which environment variables change it
(`--fastboot-key-env PREFIX[,PREFIX]`). They are part of the snapshot key (options()), so an
agent that restores the snapshot rebuilds the same adapter from it. The files and directories
CMD names (a GGUF, a model directory, the server's own script) are keyed by content
(key_paths()), like vLLM's MODEL.

The oracle is a greedy `/v1/completions` request (`/v1/chat/completions` where the server has
no completions route). It compares the strongest evidence the server returns, and records which:
`token_ids` (vLLM-style servers), `logprobs` (the sampled tokens and their log-probabilities,
as llama.cpp returns them), else `text` (transformers serve ignores `logprobs`).
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastboot.engines.base import (
    ORACLE_MAX_TOKENS,
    ORACLE_PROMPT,
    WARMUP_PROMPTS,
    EngineError,
    compare_token_ids,
    request_json,
)
from fastboot.errors import DependencyError, UsageError

NAME = "command"
SEPARATOR = "--"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = "8000"
#: The flags fastboot reads before the separator; every other flag belongs to CMD.
LISTEN_FLAGS = ("--host", "--port")
#: Log-probabilities of a restored process are bit-for-bit the dumped one's; this only absorbs
#: a server that rounds them for JSON.
LOGPROB_TOLERANCE = 1e-4


@dataclass(frozen=True)
class CommandOptions:
    """What fastboot is told about the server (see the module doc)."""

    model: str = ""
    """The name requests carry in "model" (MODEL); "" : the first of /v1/models, else none."""
    ready_path: str = "/v1/models"
    """GET this until it answers 2xx: the server is ready."""
    version_cmd: str = ""
    """A shell-free command line whose stdout is the server's version ("" : unversioned)."""
    key_env: tuple[str, ...] = ()
    """Environment variables with these prefixes are part of the snapshot key."""

    def to_json(self) -> dict[str, Any]:
        """The non-default options (the snapshot key's `engine_options`)."""
        out: dict[str, Any] = {}
        for name, default in vars(CommandOptions()).items():
            value = getattr(self, name)
            if value != default:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CommandOptions:
        unknown = set(data) - set(vars(CommandOptions()))
        if unknown:
            raise UsageError(f"unknown options of the command engine: {', '.join(sorted(unknown))}")
        values = dict(data)
        if "key_env" in values:
            values["key_env"] = tuple(values["key_env"])
        if not str(values.get("ready_path", "/")).startswith("/"):
            raise UsageError(f"the ready path must start with /, got {values['ready_path']!r}")
        return cls(**values)


def split_command(engine_argv: list[str]) -> tuple[list[str], list[str]]:
    """(listen flags, CMD ARG...) of the engine's argv; UsageError naming the fix otherwise."""
    if SEPARATOR not in engine_argv or engine_argv.index(SEPARATOR) == len(engine_argv) - 1:
        raise UsageError(
            "--fastboot-engine command needs the server's command after `--`: "
            "fastboot serve [MODEL] --fastboot-engine command --port 8001 -- CMD ARG... "
            "({host}, {port} and {model} in ARG are filled in)"
        )
    at = engine_argv.index(SEPARATOR)
    listen, cmd = engine_argv[:at], engine_argv[at + 1 :]
    i = 0
    while i < len(listen):
        name, eq, _ = listen[i].partition("=")
        if name not in LISTEN_FLAGS or (not eq and i + 1 >= len(listen)):
            raise UsageError(
                f"{listen[i]!r} before `--`: with --fastboot-engine command only --host and "
                "--port go there; the server's own flags go after `--`"
            )
        i += 1 if eq else 2
    return listen, cmd


def listen_value(listen: list[str], flag: str, default: str) -> str:
    """The last value of --host/--port among the listen flags."""
    value = default
    for i, token in enumerate(listen):
        name, eq, inline = token.partition("=")
        if name == flag:
            value = inline if eq else listen[i + 1]
    return value


def fill(argument: str, values: Mapping[str, str]) -> str:
    """`{host}`, `{port}`, `{model}` filled in (plain replacement: other braces, say JSON in an
    argument, stay as they are)."""
    for name, value in values.items():
        argument = argument.replace("{" + name + "}", value)
    return argument


class CommandEngine:
    """The `Engine` protocol for a user's server command (see the module doc)."""

    NAME = NAME
    HAS_PLUGIN = False
    CPU_FLOOR = "x86-64-v2"  # unknown: the user knows what their server runs on
    INSTALL_HINT = "install the server CMD names (fastboot runs it as given)"

    def __init__(self, options: CommandOptions = CommandOptions()) -> None:
        self.settings = options
        self.ENV_PREFIXES: tuple[str, ...] = options.key_env

    def options(self) -> dict[str, Any]:
        return self.settings.to_json()

    def key_paths(self, model: str, engine_argv: list[str]) -> list[str]:
        """Every existing file or directory CMD's arguments name (as a token or after `=`),
        placeholders aside: their content is the snapshot's, like vLLM's MODEL."""
        del model  # keyed by the caller already
        _, cmd = split_command(engine_argv)
        paths = []
        for token in cmd[1:]:
            for candidate in (token, token.partition("=")[2]):
                if candidate and "{" not in candidate and os.path.exists(candidate):
                    paths.append(str(Path(candidate).resolve()))
        return sorted(set(paths))

    def version(self, site_packages: list[str] | None = None) -> str:
        """The version command's output, or "unversioned" without one."""
        del site_packages  # the command knows where its server lives
        if not self.settings.version_cmd:
            return "unversioned"
        argv = shlex.split(self.settings.version_cmd)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
        except (OSError, subprocess.SubprocessError) as exc:
            raise DependencyError(f"the engine version command {argv} failed: {exc}") from exc
        return done.stdout.strip() or "unversioned"

    def command(self, model: str, engine_argv: list[str], python: Path | None = None) -> list[str]:
        if python is not None:
            raise UsageError("--fastboot-env-image does not work with --fastboot-engine command")
        listen, cmd = split_command(engine_argv)
        values = {
            "host": listen_value(listen, "--host", DEFAULT_HOST),
            "port": listen_value(listen, "--port", DEFAULT_PORT),
            "model": model,
        }
        return [fill(argument, values) for argument in cmd]

    def socket_env(self, directory: Path) -> dict[str, str]:
        del directory  # an arbitrary server says nothing about where its sockets go
        return {}

    def wait_ready(self, url: str, deadline_s: float, alive: Callable[[], bool]) -> str:
        """Poll the ready path until it answers 2xx; the model name requests carry."""
        start = time.monotonic()
        while True:
            if not alive():
                raise EngineError("the engine exited before it was ready")
            try:
                with urllib.request.urlopen(url + self.settings.ready_path, timeout=5):
                    break
            except (OSError, http.client.HTTPException):
                pass  # not up yet (urllib's HTTPError for a non-2xx is an OSError)
            if time.monotonic() - start > deadline_s:
                raise EngineError(f"{url}{self.settings.ready_path} did not answer in time")
            time.sleep(0.2)
        if self.settings.model:
            return self.settings.model
        try:
            return str(request_json(url + "/v1/models", timeout=10)["data"][0]["id"])
        except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError):
            return ""  # requests then carry no "model": the server's only one answers

    def warm_up(self, url: str, model: str) -> None:
        for prompt in WARMUP_PROMPTS:
            _generate(url, model, prompt, 8)
        with contextlib.suppress(urllib.error.HTTPError):  # a server without chat: what it has
            request_json(url + "/v1/chat/completions", _body(model, "hi", 4, chat=True))

    def oracle(self, url: str, model: str) -> dict[str, Any]:
        endpoint, choice = _generate(url, model, ORACLE_PROMPT, ORACLE_MAX_TOKENS)
        recorded: dict[str, Any] = {
            "prompt": ORACLE_PROMPT,
            "max_tokens": ORACLE_MAX_TOKENS,
            "endpoint": endpoint,
            "text": _text(choice),
        }
        logprobs = choice.get("logprobs") or {}
        if choice.get("token_ids"):
            recorded |= {"compare": "token_ids", "token_ids": list(choice["token_ids"])}
        elif logprobs.get("tokens"):
            recorded |= {
                "compare": "logprobs",
                "tokens": list(logprobs["tokens"]),
                "token_logprobs": list(logprobs.get("token_logprobs") or []),
            }
        else:
            recorded["compare"] = "text"
        return recorded

    def check_oracle(self, url: str, model: str, recorded: dict[str, Any]) -> None:
        _, choice = _generate(url, model, recorded["prompt"], recorded["max_tokens"])
        compare = recorded["compare"]
        if compare == "token_ids":
            compare_token_ids(recorded, list(choice.get("token_ids") or []))
            return
        if compare == "logprobs":
            logprobs = choice.get("logprobs") or {}
            _compare_logprobs(recorded, logprobs.get("tokens"), logprobs.get("token_logprobs"))
            return
        if _text(choice) != recorded["text"]:
            raise EngineError(
                f"oracle mismatch: expected text {recorded['text']!r}, got {_text(choice)!r}"
            )

    def doctor(self) -> tuple[bool, str, str]:
        return True, "any OpenAI-compatible server: --fastboot-engine command -- CMD", ""

    def quiesce(self, url: str) -> None:
        del url  # nothing fastboot knows to release in someone else's server (use hooks)

    def resume(self, url: str) -> None:
        del url


def configured(options: Mapping[str, Any]) -> CommandEngine:
    """The adapter for these options (a snapshot key's `engine_options`, or the CLI's)."""
    return CommandEngine(CommandOptions.from_json(options))


def _body(model: str, prompt: str, max_tokens: int, *, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0}
    if model:
        body["model"] = model
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body |= {"prompt": prompt, "logprobs": 1}
    return body


def _generate(url: str, model: str, prompt: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    """(endpoint, first choice) of a greedy request: /v1/completions, or chat where the server
    has no completions route (404/405)."""
    try:
        answer = request_json(url + "/v1/completions", _body(model, prompt, max_tokens, chat=False))
        return "completions", dict(answer["choices"][0])
    except urllib.error.HTTPError as exc:
        if exc.code not in (404, 405):
            raise EngineError(f"/v1/completions answered {exc.code}: {exc.read()[:300]!r}") from exc
    answer = request_json(url + "/v1/chat/completions", _body(model, prompt, max_tokens, chat=True))
    return "chat", dict(answer["choices"][0])


def _text(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return str(choice["text"])
    return str((choice.get("message") or {}).get("content") or "")


def _compare_logprobs(recorded: dict[str, Any], tokens: Any, logprobs: Any) -> None:
    if tokens != recorded["tokens"]:
        raise EngineError(f"oracle mismatch: expected tokens {recorded['tokens']}, got {tokens}")
    want = recorded["token_logprobs"]
    got = list(logprobs or [])
    close = len(got) == len(want) and all(
        (a is None and b is None)
        or (a is not None and b is not None and math.isclose(a, b, abs_tol=LOGPROB_TOLERANCE))
        for a, b in zip(want, got, strict=True)
    )
    if not close:
        raise EngineError(f"oracle mismatch: expected log-probabilities {want}, got {got}")
