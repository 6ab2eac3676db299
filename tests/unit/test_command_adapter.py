"""The command engine adapter: argv, options, key, readiness and the oracle (fake servers)."""

from __future__ import annotations

import json
import sys
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from fastboot import engines
from fastboot.boot.site import IsolatedSite
from fastboot.cli.engine_choice import choose_engine
from fastboot.cli.serve import FLAGS
from fastboot.engines.base import EngineError
from fastboot.engines.command import CommandEngine, CommandOptions
from fastboot.errors import UsageError
from fastboot.host.netns import Link
from fastboot.serve.isolated import strip_listen_flags
from fastboot.snapshot.key import model_identity, snapshot_key
from tests.unit.http_fakes import JsonHandler, running

SERVER = ["python", "-m", "srv", "--model", "{model}", "--host", "{host}", "--port", "{port}"]


def test_the_command_line_becomes_listen_flags_then_the_server_command() -> None:
    argv = ["M", "--fastboot-engine", "command", "--port", "8001", "--fastboot-refresh"]
    split, engine = choose_engine([*argv, "--", *SERVER], FLAGS)
    assert engine.name == "command"
    assert engine.engine_argv == ["--port", "8001", "--", *SERVER]
    assert (engine.host, engine.port, engine.model) == (None, 8001, "M")
    assert engine.options == {"model": "M"}
    assert split.fastboot["refresh"] is True
    # The placeholders are filled at launch; the defaults are loopback and 8000.
    adapter = engines.get(engine.name, engine.options)
    assert adapter.command("M", engine.engine_argv) == [
        "python", "-m", "srv", "--model", "M", "--host", "127.0.0.1", "--port", "8001",
    ]  # fmt: skip
    # A server's own --port after `--` is not fastboot's.
    assert choose_engine(["--fastboot-engine=command", "--", *SERVER], FLAGS)[1].port is None


def test_command_flags_become_options() -> None:
    argv = ["--fastboot-engine", "command", "--fastboot-ready-path", "/health"]
    argv += ["--fastboot-engine-version-cmd", "srv --version", "--fastboot-key-env", "SRV_,HF_"]
    _, engine = choose_engine([*argv, "--", *SERVER], FLAGS)
    assert engine.model == ""
    assert engine.options == {
        "ready_path": "/health",
        "version_cmd": "srv --version",
        "key_env": ["SRV_", "HF_"],
    }
    adapter = engines.get("command", engine.options)
    assert adapter.ENV_PREFIXES == ("SRV_", "HF_")
    assert adapter.options() == engine.options  # what the key records rebuilds the same


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["M", "--fastboot-engine", "command"], "needs the server's command after `--`"),
        (["M", "--fastboot-engine", "command", "--"], "needs the server's command after `--`"),
        (
            ["M", "--fastboot-engine", "command", "--max-model-len", "9", "--", "srv"],
            "only --host and --port go there",
        ),
        (["M", "--fastboot-ready-path", "/health"], "only for --fastboot-engine command"),
        (["--fastboot-engine", "vllm", "--port", "1"], "MODEL must be the first argument"),
        (
            ["--fastboot-engine", "command", "--fastboot-ready-path", "health", "--", "srv"],
            "must start with /",
        ),
    ],
)
def test_command_lines_that_do_not_fit_are_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        choose_engine(argv, FLAGS)


def test_other_engines_take_no_options() -> None:
    with pytest.raises(UsageError, match="engine vllm takes no options"):
        engines.get("vllm", {"ready_path": "/x"})
    with pytest.raises(UsageError, match="unknown options of the command engine: bogus"):
        engines.get("command", {"bogus": 1})


def test_an_isolated_site_puts_its_listen_flags_before_the_command() -> None:
    site = IsolatedSite(Link("ns", "h", "10.0.0.1", "10.0.0.2"))
    argv = site.engine_argv(strip_listen_flags(["--host", "127.0.0.1", "--port=9", "--", *SERVER]))
    assert argv == ["--host", "0.0.0.0", "--port", "8000", "--", *SERVER]
    assert CommandEngine().command("M", argv)[-4:] == ["--host", "0.0.0.0", "--port", "8000"]
    # vLLM's flags (no `--`) still get them last.
    assert site.engine_argv(["--max-model-len", "9"])[-2:] == ["--port", "8000"]


def test_the_files_the_command_names_are_keyed_by_content(tmp_path: Path) -> None:
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"one")
    argv = ["--", "srv", f"--model={weights}", "--config", str(tmp_path), "{model}", "nofile"]
    named = CommandEngine().key_paths("", argv)
    assert named == sorted([str(weights), str(tmp_path)])

    def key() -> str:
        identity = model_identity("", None, named)
        return snapshot_key(
            engine="command",
            engine_version="unversioned",
            argv=argv,
            model=identity,
            env_prefixes=(),
            engine_options={"ready_path": "/health"},
            environ={},
        )[0]

    before = key()
    assert key() == before
    weights.write_bytes(b"two")
    assert key() != before


def test_version_comes_from_the_version_command() -> None:
    command = f"{sys.executable} -c 'print(\"srv 1.2\")'"
    assert CommandEngine(CommandOptions(version_cmd=command)).version() == "srv 1.2"
    assert CommandEngine().version() == "unversioned"
    with pytest.raises(Exception, match="version command"):
        CommandEngine(CommandOptions(version_cmd="/nonexistent/srv --version")).version()


class FakeServer(JsonHandler):
    """An OpenAI-ish server; the class attributes say what it returns."""

    choice: ClassVar[dict[str, Any]] = {}
    completions = True
    ready = True
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200 if self.ready else 503, {})
        elif self.path == "/v1/models":
            self._answer(200, {"data": [{"id": "listed"}]})
        else:
            self._answer(404, {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.seen.append(body)
        if self.path == "/v1/completions" and self.completions:
            self._answer(200, {"choices": [self.choice]})
        elif self.path == "/v1/chat/completions":
            self._answer(200, {"choices": [{"message": {"content": "chat says"}}]})
        else:
            self._answer(404, {})


def serve(choice: dict[str, Any], *, completions: bool = True) -> Any:
    handler = type("Handler", (FakeServer,), {"choice": choice, "completions": completions})
    handler.seen = []
    return handler, running(ThreadingHTTPServer(("127.0.0.1", 0), handler))


LOGPROBS = {"text": " a b", "logprobs": {"tokens": [" a", " b"], "token_logprobs": [-1.0, -2.0]}}


@pytest.mark.parametrize(
    ("choice", "compare"),
    [
        ({"text": " a b", "token_ids": [5, 6]}, "token_ids"),
        (LOGPROBS, "logprobs"),
        ({"text": " a b"}, "text"),
    ],
)
def test_the_oracle_records_the_strongest_evidence(choice: dict[str, Any], compare: str) -> None:
    handler, server = serve(choice)
    with server as url:
        engine = CommandEngine()
        assert engine.wait_ready(url, 5, lambda: True) == "listed"
        recorded = engine.oracle(url, "listed")
        assert recorded["compare"] == compare
        assert recorded["endpoint"] == "completions"
        assert handler.seen[-1]["temperature"] == 0 and handler.seen[-1]["model"] == "listed"
        engine.check_oracle(url, "listed", recorded)  # the same server reproduces it
        handler.choice = {**choice, "text": " a c", "token_ids": [5, 7]}
        if compare == "logprobs":
            handler.choice = {**LOGPROBS, "logprobs": {**LOGPROBS["logprobs"], "tokens": [" a"]}}
        with pytest.raises(EngineError, match="oracle mismatch"):
            engine.check_oracle(url, "listed", recorded)


def test_log_probabilities_must_agree_too() -> None:
    handler, server = serve(LOGPROBS)
    with server as url:
        engine = CommandEngine()
        recorded = engine.oracle(url, "")
        assert "model" not in handler.seen[-1]  # no name known: the server's only model
        handler.choice = {
            **LOGPROBS,
            "logprobs": {**LOGPROBS["logprobs"], "token_logprobs": [-1.0, -2.5]},
        }
        with pytest.raises(EngineError, match="log-probabilities"):
            engine.check_oracle(url, "", recorded)


def test_a_server_without_completions_is_asked_through_chat() -> None:
    _, server = serve({}, completions=False)
    with server as url:
        engine = CommandEngine(CommandOptions(model="M", ready_path="/health"))
        assert engine.wait_ready(url, 5, lambda: True) == "M"  # MODEL, not the listing
        engine.warm_up(url, "M")
        recorded = engine.oracle(url, "M")
        assert (recorded["endpoint"], recorded["compare"], recorded["text"]) == (
            "chat",
            "text",
            "chat says",
        )


def test_readiness_waits_for_the_ready_path_and_notices_an_exit() -> None:
    handler, server = serve({})
    handler.ready = False
    with server as url:
        engine = CommandEngine(CommandOptions(ready_path="/health"))
        with pytest.raises(EngineError, match="did not answer in time"):
            engine.wait_ready(url, 0.5, lambda: True)
        with pytest.raises(EngineError, match="exited before it was ready"):
            engine.wait_ready(url, 5, lambda: False)
