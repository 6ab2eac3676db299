"""vLLM general plugin (entry point group `vllm.general_plugins`).

vLLM calls `register()` in every process of the engine tree (API server, EngineCore, workers).
Today it only proves it ran; the snapshot quiesce/resume hooks attach here.
"""

from __future__ import annotations

from .report import launched_by_fastboot, report_loaded


def register() -> None:
    if not launched_by_fastboot():
        return
    report_loaded("vllm")
