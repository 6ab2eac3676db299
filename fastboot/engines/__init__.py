"""Engine adapters: how fastboot launches and talks to an inference server.

An adapter is one module here that satisfies the `Engine` protocol (fastboot.engines.base):
flag translation, the environment variables that change the engine (keyed), readiness, warm-up,
the oracle and its comparison, quiesce/resume, version and install hint. It is all the rest of
fastboot uses of an engine; nothing outside this package, patches/ and models/ imports one by
name (import-linter checks it, see pyproject.toml).

Adding an engine is one adapter file, plus its line in ADAPTERS below (where mypy checks the
module against the protocol). An adapter the user configures (the `command` engine: any
OpenAI-compatible server) is a class; CONFIGURABLE builds it from its options, which the
snapshot key records (Engine.options), so whoever restores the snapshot gets the same adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastboot.engines import command, sglang, vllm
from fastboot.engines.base import Engine, EngineError, base_url
from fastboot.errors import UsageError

__all__ = [
    "ADAPTERS",
    "CONFIGURABLE",
    "DEFAULT",
    "ISOLATED",
    "NAMES",
    "Engine",
    "EngineError",
    "base_url",
    "get",
]

ADAPTERS: dict[str, Engine] = {
    vllm.NAME: vllm,
    sglang.NAME: sglang,
    command.NAME: command.CommandEngine(),
}
#: Adapters built from options (the CLI's --fastboot-... flags, or a snapshot key's).
CONFIGURABLE: dict[str, Callable[[Mapping[str, Any]], Engine]] = {
    command.NAME: command.configured,
}
#: The engine `fastboot serve` runs unless told otherwise (it is a drop-in for `vllm serve`).
DEFAULT = vllm.NAME
NAMES = tuple(ADAPTERS)
#: Engines that run isolated (replicas, `snapshot create`, `serve --fastboot-isolated`): SGLang's
#: isolated layout has never run (it is not installed where fastboot is tested).
ISOLATED = (vllm.NAME, command.NAME)


def get(name: str, options: Mapping[str, Any] | None = None) -> Engine:
    """The adapter for engine `name` with options (Engine.options); UsageError naming the
    choices, or the options it does not take, otherwise."""
    if name not in ADAPTERS:
        raise UsageError(f"unknown engine {name!r}: choose one of {', '.join(NAMES)}")
    if name in CONFIGURABLE:
        return CONFIGURABLE[name](options or {})
    if options:
        raise UsageError(f"engine {name} takes no options ({', '.join(sorted(options))})")
    return ADAPTERS[name]
