"""Engine adapters: how fastboot launches and talks to an inference server.

An adapter is one module here that satisfies the `Engine` protocol (fastboot.engines.base):
flag translation, the environment variables that change the engine (keyed), readiness, warm-up,
the oracle and its comparison, quiesce/resume, version and install hint. It is all the rest of
fastboot uses of an engine; nothing outside this package, patches/ and models/ imports one by
name (import-linter checks it, see pyproject.toml).

Adding an engine is one adapter file, plus its line in ADAPTERS below (where mypy checks the
module against the protocol).
"""

from __future__ import annotations

from fastboot.engines import sglang, vllm
from fastboot.engines.base import Engine, EngineError, base_url
from fastboot.errors import UsageError

__all__ = ["ADAPTERS", "DEFAULT", "Engine", "EngineError", "base_url", "get"]

ADAPTERS: dict[str, Engine] = {vllm.NAME: vllm, sglang.NAME: sglang}
#: The engine `fastboot serve` runs unless told otherwise (it is a drop-in for `vllm serve`).
DEFAULT = vllm.NAME
NAMES = tuple(ADAPTERS)


def get(name: str) -> Engine:
    """The adapter for engine `name`; UsageError naming the choices otherwise."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise UsageError(f"unknown engine {name!r}: choose one of {', '.join(NAMES)}") from None
