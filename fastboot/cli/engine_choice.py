"""Which engine a `fastboot serve` or `fastboot snapshot create` command line runs, and how.

    fastboot serve MODEL [vllm serve flags]                          vLLM (the default)
    fastboot serve MODEL --fastboot-engine sglang [vllm serve flags] SGLang, flags translated
    fastboot serve [MODEL] --fastboot-engine command [--host H] [--port P] \\
        [--fastboot-ready-path PATH] [--fastboot-engine-version-cmd CMD] \\
        [--fastboot-key-env PREFIX[,PREFIX]] -- SERVER ARG...           any OpenAI server

For the command engine MODEL is optional (the name requests carry; `{model}` in ARG), only
--host/--port go before `--`, and the three command flags become its options
(fastboot.engines.command.CommandOptions), which the snapshot key records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastboot import engines
from fastboot.cli.engine_argv import FlagSpec, SplitArgv, missing_model, split_serve_argv
from fastboot.engines import command
from fastboot.errors import UsageError

ENGINE_FLAG = FlagSpec(
    "engine",
    "the engine: vllm (default), sglang (the flags stay vLLM's, translated), or command (any "
    "OpenAI-compatible server given after `--`; `--engine NAME` is read as this flag: vLLM "
    "has no --engine)",
    True,
)
#: The command engine's own flags, flag name -> CommandOptions field.
COMMAND_FLAGS = {
    FlagSpec(
        "ready-path",
        "command engine: GET this path until it answers 2xx (default /v1/models)",
        True,
    ): "ready_path",
    FlagSpec(
        "engine-version-cmd",
        "command engine: a command whose output is the server's version (snapshot key)",
        True,
    ): "version_cmd",
    FlagSpec(
        "key-env",
        "command engine: environment variables with these comma-separated prefixes are part "
        "of the snapshot key",
        True,
    ): "key_env",
}
CPU_BASELINE_FLAG = FlagSpec(
    "cpu-baseline",
    "hold the engine's code to an x86-64 level (x86-64-v2, -v3, -v4) so its snapshot restores "
    "on every CPU at or above it; native (the default for serve): this CPU's own",
    True,
)
FLAGS = [ENGINE_FLAG, *COMMAND_FLAGS, CPU_BASELINE_FLAG]


@dataclass(frozen=True)
class EngineChoice:
    """The engine a command line runs, with what it runs it on."""

    name: str
    options: dict[str, Any]
    model: str
    engine_argv: list[str]
    host: str | None
    port: int | None


def choose_engine(argv: Sequence[str], specs: Sequence[FlagSpec]) -> tuple[SplitArgv, EngineChoice]:
    """Split argv (specs must include FLAGS) and read the engine it asks for; UsageError with
    the fix for a command line that does not fit its engine."""
    split = split_serve_argv(argv, specs, model_required=False)
    name = str(split.fastboot.get("engine", engines.DEFAULT))
    given: dict[str, Any] = {
        field: split.fastboot[spec.name]
        for spec, field in COMMAND_FLAGS.items()
        if spec.name in split.fastboot
    }
    if name != command.NAME:
        if given:
            flags = ", ".join(s.flag for s, f in COMMAND_FLAGS.items() if f in given)
            raise UsageError(f"{flags}: only for --fastboot-engine command")
        if not split.model:
            raise missing_model(argv)
        engine = EngineChoice(name, {}, split.model, split.engine_argv, split.host, split.port)
        return split, engine
    # MODEL only as the first argument: a `--model` among the server's flags is the server's.
    model = argv[0] if argv and argv[0] != "--" and not argv[0].startswith("-") else ""
    at = len(split.engine_argv) if split.separator is None else split.separator
    engine_argv = [*split.engine_argv[:at], command.SEPARATOR, *split.engine_argv[at:]]
    listen, _ = command.split_command(engine_argv)  # UsageError for what does not fit
    if "key_env" in given:
        given["key_env"] = [p for p in str(given["key_env"]).split(",") if p]
    options = {"model": model, **given} if model else given
    engines.get(name, options)  # options it cannot take fail now
    head = SplitArgv(model, split.fastboot, listen)
    return split, EngineChoice(name, options, model, engine_argv, head.host, head.port)
