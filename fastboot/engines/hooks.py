"""Quiesce/resume hooks: what runs around a dump and after a restore.

`--fastboot-hooks MODULE` names an importable module with either or both of:

    def quiesce(url: str) -> None   after warm-up and the oracle, just before the dump: release
                                    what need not be in the image (GPU: vLLM sleep level 1 frees
                                    the KV cache; SGLang's memory saver does the same)
    def resume(url: str) -> None    after a restore, before the oracle check: take it back

`url` is the engine's base URL. On CPU nothing needs releasing, so the default is no hooks; the
GPU path plugs its sleep/wake (and the CUDA checkpoint calls) in here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from fastboot.errors import UsageError

Hook = Callable[[str], None]


def _nothing(url: str) -> None:
    del url


@dataclass(frozen=True)
class Hooks:
    """The two hook functions (no-ops where the module has none)."""

    quiesce: Hook = _nothing
    resume: Hook = _nothing
    source: str = "none"
    """The module they came from."""


def load(module_name: str | None) -> Hooks:
    """Hooks from module_name, or no-op hooks. Raises UsageError if it cannot be imported."""
    if not module_name:
        return Hooks()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--fastboot-hooks {module_name}: cannot import it ({exc})") from exc
    found = {name: getattr(module, name, None) for name in ("quiesce", "resume")}
    if not any(callable(f) for f in found.values()):
        raise UsageError(f"--fastboot-hooks {module_name} defines neither quiesce nor resume")
    return Hooks(
        quiesce=found["quiesce"] if callable(found["quiesce"]) else _nothing,
        resume=found["resume"] if callable(found["resume"]) else _nothing,
        source=module_name,
    )
