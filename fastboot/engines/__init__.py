"""Engine adapters: how fastboot launches and talks to vLLM and SGLang.

Each adapter module (`fastboot.engines.vllm`, `fastboot.engines.sglang`) has the same functions,
which is all `fastboot serve` uses of an engine:

    NAME                                    "vllm" / "sglang": the snapshot key's engine
    ENV_PREFIXES                            environment variables that change the engine (keyed)
    HAS_PLUGIN                              whether fastboot's engine-side plugin loads in it
    version(site_packages=None)             the installed engine's version
    command(model, engine_argv, python)     the engine's argv (python: another environment's)
    wait_ready(url, deadline_s, alive)      poll until it serves; the served model name
    warm_up(url, model)                     requests that make it compile what serving needs
    oracle(url, model)                      a greedy request: {prompt, max_tokens, token_ids, text}
    generate_ids(url, model, prompt, n)     the greedy token ids for prompt (the oracle check)
"""

from __future__ import annotations

import importlib
from types import ModuleType

from fastboot.errors import UsageError

NAMES = ("vllm", "sglang")


def get(name: str) -> ModuleType:
    """The adapter module for engine `name`; UsageError naming the choices otherwise."""
    if name not in NAMES:
        raise UsageError(f"unknown engine {name!r}: choose one of {', '.join(NAMES)}")
    return importlib.import_module(f"fastboot.engines.{name}")
