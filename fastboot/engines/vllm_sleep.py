"""vLLM sleep mode as fastboot quiesce/resume hooks: `--fastboot-hooks fastboot.engines.vllm_sleep`.

Before the dump, `quiesce` puts the engine to sleep at level 1: the KV cache is discarded and the
weights are offloaded to host memory, so device memory holds neither and the CUDA checkpoint
(and the snapshot) does not carry the KV cache. After a restore, `resume` wakes it up.

The endpoints exist only when the engine was started for it (checked in vLLM 0.32's
`entrypoints/serve/dev/sleep/api_router.py`):

    VLLM_SERVER_DEV_MODE=1          registers POST /sleep?level=N, POST /wake_up[?tags=...],
                                    GET /is_sleeping and POST /collective_rpc
    vllm serve ... --enable-sleep-mode   (CUDA only; turns on the cumem allocator)

Level 2 discards the weights too; waking then needs `wake_up(["weights"])`,
`collective_rpc("reload_weights")` and `wake_up(["kv_cache"])` (the order vLLM's own snapshot
uses). Both levels are here; which is cheaper end to end is unmeasured (docs/gpu.md).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from fastboot.engines.base import EngineError

logger = logging.getLogger(__name__)

HINT = (
    "start the engine with VLLM_SERVER_DEV_MODE=1 in its environment and --enable-sleep-mode "
    "(CUDA only)"
)


def _call(url: str, path: str, method: str = "POST", body: Any = None, timeout: float = 300) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if key := os.environ.get("VLLM_API_KEY"):
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        if exc.code == 404:
            raise EngineError(f"{method} {path}: the engine has no such endpoint; {HINT}") from exc
        raise EngineError(f"{method} {path} answered {exc.code}: {detail}; {HINT}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise EngineError(f"{method} {path} on {url} failed: {exc}") from exc
    try:
        return json.loads(raw) if raw else None
    except ValueError as exc:
        raise EngineError(f"{method} {path} answered something that is not JSON") from exc


def is_sleeping(url: str) -> bool:
    answer = _call(url, "/is_sleeping", method="GET", timeout=10)
    return bool(isinstance(answer, dict) and answer.get("is_sleeping"))


def sleep(url: str, level: int = 1) -> None:
    """Put the engine to sleep (requests in flight are aborted) and check that it is."""
    if level not in (1, 2):
        raise ValueError(f"sleep level {level}: fastboot uses 1 or 2")
    started = time.monotonic()
    _call(url, f"/sleep?level={level}")
    if not is_sleeping(url):
        raise EngineError(f"the engine answered /sleep?level={level} but is not sleeping")
    logger.info("engine asleep (level %d) in %.2f s", level, time.monotonic() - started)


def wake_up(url: str, tags: Sequence[str] = ()) -> None:
    """Wake the engine (all of it, or only `tags`: "weights", "kv_cache")."""
    query = "?" + urllib.parse.urlencode([("tags", t) for t in tags]) if tags else ""
    _call(url, "/wake_up" + query)


def reload_weights(url: str) -> None:
    """Re-read the weights from their files (after a level 2 sleep and a wake of "weights")."""
    _call(url, "/collective_rpc", body={"method": "reload_weights"})


def quiesce(url: str) -> None:
    """Hook: sleep level 1 just before the CUDA checkpoint and the dump."""
    sleep(url, 1)


def resume(url: str) -> None:
    """Hook: wake after the restore (and after the CUDA restore/unlock), before the oracle."""
    started = time.monotonic()
    wake_up(url)
    if is_sleeping(url):
        raise EngineError("the engine answered /wake_up but still reports sleeping")
    logger.info("engine awake in %.2f s", time.monotonic() - started)


def quiesce_level2(url: str) -> None:
    """Sleep level 2: weights discarded too (they are re-read from their files on resume)."""
    sleep(url, 2)


def resume_level2(url: str) -> None:
    """Wake from level 2 in vLLM's order: weights memory, reload the weights, KV cache."""
    started = time.monotonic()
    wake_up(url, ["weights"])
    reload_weights(url)
    wake_up(url, ["kv_cache"])
    if is_sleeping(url):
        raise EngineError("the engine was woken from level 2 but still reports sleeping")
    logger.info("engine awake from level 2 in %.2f s", time.monotonic() - started)
