"""SGLang's memory saver as fastboot quiesce/resume hooks:
`--fastboot-hooks fastboot.engines.sglang_memory_saver` (with `--enable-sleep-mode`, which
fastboot translates to SGLang's `--enable-memory-saver`).

Before the dump, `quiesce` asks the idle engine to release its GPU memory (KV cache and
weights: `POST /release_memory_occupation {}`), so neither is in the CUDA checkpoint; after a
restore, `resume` takes it back (`POST /resume_memory_occupation {}`). Reported by others: a
release while requests run can abort the engine; fastboot quiesces only after warm-up and the
oracle, when nothing is in flight. Unverified on a GPU here (docs/gpu.md).
"""

from __future__ import annotations

import logging
import urllib.error

from fastboot.engines.base import EngineError, request_json

logger = logging.getLogger(__name__)

HINT = "start SGLang with --enable-memory-saver (fastboot translates --enable-sleep-mode to it)"


def _post(url: str, path: str) -> None:
    try:
        request_json(url + path, {}, timeout=300)
    except urllib.error.HTTPError as exc:
        raise EngineError(f"POST {path} answered {exc.code}: {HINT}") from exc


def quiesce(url: str) -> None:
    """Release the engine's GPU memory (KV cache and weights) before the dump."""
    _post(url, "/release_memory_occupation")
    logger.info("SGLang released its GPU memory for the snapshot")


def resume(url: str) -> None:
    """Take the GPU memory back after a restore."""
    _post(url, "/resume_memory_occupation")
    logger.info("SGLang resumed its GPU memory")
