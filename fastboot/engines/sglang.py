"""SGLang as fastboot launches it: `fastboot serve MODEL --engine sglang [vllm-style flags]`.

Users write the command line they would give `vllm serve`; fastboot runs
`python -m sglang.launch_server --model-path MODEL ...` with the flags translated through
`FLAGS` (value flags) and `SWITCHES` (flags without a value). A flag fastboot does not know is
passed on verbatim, with a warning, so SGLang's own flags (`--attention-backend`, ...) work too.

Where the two engines' defaults differ in a way a drop-in would notice, vLLM's are applied:
port 8000 (SGLang: 30000) and host 0.0.0.0 (SGLang: 127.0.0.1), unless the command line says.

Readiness is the same as vLLM's: /health answers and /v1/models lists the model. The oracle
uses SGLang's native `POST /generate`, whose answer carries the generated token ids
(`output_ids`); warm-up goes through the OpenAI routes clients use. SGLang has no plugin hook
like vLLM's general plugins, so nothing of fastboot runs inside it (quiesce and resume are HTTP
calls: fastboot.engines.sglang_memory_saver). Nothing here has run against a real SGLang (it is
not installed on the CPU machines; tests/unit/test_sglang.py runs it against a fake server; see
docs/gpu.md).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastboot.engines import base
from fastboot.engines.base import EngineError, request_json
from fastboot.errors import DependencyError, UsageError

logger = logging.getLogger(__name__)

NAME = "sglang"
ENV_PREFIXES: tuple[str, ...] = ("SGLANG_",)
HAS_PLUGIN = False
#: Unmeasured (SGLang is not installable here); its CPU kernels are assumed to need AVX2.
CPU_FLOOR = "x86-64-v3"
INSTALL_HINT = "pip install 'fastboot[sglang]'"

#: vLLM flag -> SGLang flag, for flags that take a value.
FLAGS: dict[str, str] = {
    "--model": "--model-path",
    "--tokenizer": "--tokenizer-path",
    "--host": "--host",
    "--port": "--port",
    "--max-model-len": "--context-length",
    "--tensor-parallel-size": "--tp-size",
    "-tp": "--tp-size",
    "--pipeline-parallel-size": "--pp-size",
    "-pp": "--pp-size",
    "--data-parallel-size": "--dp-size",
    "-dp": "--dp-size",
    "--gpu-memory-utilization": "--mem-fraction-static",
    "--max-num-seqs": "--max-running-requests",
    "--served-model-name": "--served-model-name",
    "--dtype": "--dtype",
    "--kv-cache-dtype": "--kv-cache-dtype",
    "--quantization": "--quantization",
    "-q": "--quantization",
    "--seed": "--random-seed",
    "--revision": "--revision",
    "--tokenizer-mode": "--tokenizer-mode",
    "--download-dir": "--download-dir",
    "--load-format": "--load-format",
    "--chat-template": "--chat-template",
    "--api-key": "--api-key",
    "--max-num-batched-tokens": "--chunked-prefill-size",
}

#: vLLM switch -> SGLang switch ("" drops it: SGLang already behaves that way).
SWITCHES: dict[str, str] = {
    "--trust-remote-code": "--trust-remote-code",
    "--enforce-eager": "--disable-cuda-graph",
    "--enable-prefix-caching": "",  # SGLang's radix cache is on by default
    "--no-enable-prefix-caching": "--disable-radix-cache",
    "--enable-sleep-mode": "--enable-memory-saver",
}

#: Translations whose meaning is close but not equal; each gets a warning when used.
APPROXIMATE = {
    "--gpu-memory-utilization": "SGLang's --mem-fraction-static counts weights and KV cache only",
    "--max-num-batched-tokens": "SGLang's --chunked-prefill-size bounds one prefill chunk",
}

DEFAULTS = (("--port", "8000"), ("--host", "0.0.0.0"))


@dataclass(frozen=True)
class Translation:
    """An SGLang argv and what the translation wants the user to know."""

    argv: list[str]
    """Arguments for `python -m sglang.launch_server`."""
    warnings: list[str] = field(default_factory=list)
    """One sentence per flag passed on unknown or translated approximately."""


def translate(model: str, engine_argv: list[str]) -> Translation:
    """SGLang arguments for `vllm serve MODEL engine_argv...`, order kept."""
    if not model or model.startswith("-"):
        raise UsageError("the model comes first: fastboot serve MODEL --engine sglang [flags]")
    out = ["--model-path", model]
    warnings: list[str] = []
    seen: set[str] = set()
    args = iter(engine_argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in FLAGS:
            if not eq:
                value = next(args, "")
                if not value:
                    raise UsageError(f"{name} needs a value")
            if name in ("--model",):
                raise UsageError(f"give the model once, first (not {name} {value})")
            target = FLAGS[name]
            seen.add(target)
            out += [target, value]
            if note := APPROXIMATE.get(name):
                warnings.append(f"{name} became {target}: {note}")
        elif name in SWITCHES and not eq:
            if SWITCHES[name]:
                out.append(SWITCHES[name])
        else:
            if arg.startswith("-"):
                warnings.append(f"{name} is not a flag fastboot translates; passed to SGLang as is")
            out.append(arg)
    for flag, default in DEFAULTS:
        if flag not in seen:
            out += [flag, default]
    return Translation(out, warnings)


def command(model: str, engine_argv: list[str], python: Path | None = None) -> list[str]:
    """`python -m sglang.launch_server ...` with this interpreter (or `python`, another
    environment's); logs each warning once."""
    translation = translate(model, engine_argv)
    for warning in translation.warnings:
        logger.warning("sglang: %s", warning)
    return [str(python or sys.executable), "-m", "sglang.launch_server", *translation.argv]


def options() -> dict[str, Any]:
    """Nothing to configure: the flags say it all."""
    return {}


def key_paths(model: str, engine_argv: list[str]) -> list[str]:
    """None besides MODEL (keyed by its content)."""
    del model, engine_argv
    return []


def version(site_packages: list[str] | None = None) -> str:
    """The installed SGLang's version (this environment's, or the one in site_packages);
    DependencyError with the install hint if none."""
    import importlib.metadata as md

    if site_packages is not None:
        for dist in md.distributions(name="sglang", path=site_packages):
            return str(dist.version)
        raise DependencyError(f"SGLang is not installed in {', '.join(site_packages)}")
    try:
        return md.version("sglang")
    except md.PackageNotFoundError as exc:
        raise DependencyError(f"SGLang is not installed: {INSTALL_HINT}") from exc


def generate(url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """SGLang's native greedy `POST /generate`: {"text", "output_ids", "meta_info"}."""
    body = {"text": prompt, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0}}
    result: dict[str, Any] = request_json(url + "/generate", body)
    return result


def generate_ids(url: str, model: str, prompt: str, max_tokens: int) -> list[int]:
    """The greedy generation's token ids (`model` is implied: SGLang serves one)."""
    del model
    return list(generate(url, prompt, max_tokens).get("output_ids") or [])


def warm_up(url: str, model: str) -> None:
    """vLLM's warm-up prompts through the OpenAI routes clients use (without vLLM's own
    `return_token_ids`), a chat request, and /generate, which the oracle uses."""
    for prompt in base.WARMUP_PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        request_json(url + "/v1/completions", body)
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    request_json(url + "/v1/chat/completions", chat)
    generate(url, base.WARMUP_PROMPTS[0], 8)


def oracle(url: str, model: str) -> dict[str, Any]:
    """The fixed greedy request through /generate: {prompt, max_tokens, token_ids, text}."""
    out = generate(url, base.ORACLE_PROMPT, base.ORACLE_MAX_TOKENS)
    if not out.get("output_ids"):
        raise EngineError("SGLang's /generate returned no output_ids for the oracle request")
    return {
        "prompt": base.ORACLE_PROMPT,
        "max_tokens": base.ORACLE_MAX_TOKENS,
        "token_ids": list(out["output_ids"]),
        "text": out.get("text", ""),
    }


def wait_ready(url: str, deadline_s: float, alive: Callable[[], bool]) -> str:
    """Poll /health then /v1/models (SGLang serves both, as vLLM does); the served model name."""
    return base.wait_openai_ready(url, deadline_s, alive)


def check_oracle(url: str, model: str, recorded: dict[str, Any]) -> None:
    """/generate's greedy token ids for the recorded prompt are the recorded ones."""
    base.compare_token_ids(
        recorded, generate_ids(url, model, recorded["prompt"], recorded["max_tokens"])
    )


def socket_env(directory: Path) -> dict[str, str]:
    """Nothing: fastboot knows no SGLang setting for where its local sockets go (unverified
    against a real SGLang; see the module doc)."""
    del directory
    return {}


def doctor() -> tuple[bool, str, str]:
    try:
        return True, f"sglang {version()}", ""
    except DependencyError:
        return False, "not installed", INSTALL_HINT


def quiesce(url: str) -> None:
    """Nothing by default: the memory saver is opt-in
    (`--fastboot-hooks fastboot.engines.sglang_memory_saver`, with --enable-sleep-mode)."""
    del url


def resume(url: str) -> None:
    """Nothing by default (see quiesce)."""
    del url
