"""The environment an engine is launched with, and the check that fastboot's plugin ran in it."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from fastboot import envs
from fastboot.engines import Engine
from fastboot.errors import DependencyError
from fastboot.snapshot import cpu_levels

logger = logging.getLogger(__name__)

#: NCCL transports that hold device mappings or shared buffers across processes, which a
#: per-process CUDA checkpoint cannot capture (docs/gpu.md, "Multi-GPU"): off for a
#: tensor-parallel engine. Experimental: what this costs in all-reduce throughput is unmeasured.
NCCL_CHECKPOINT_ENV = {
    "NCCL_P2P_DISABLE": "1",
    "NCCL_NVLS_ENABLE": "0",
    "NCCL_SHM_DISABLE": "1",
    "NCCL_IB_DISABLE": "1",
}


def engine_env(
    engine: Engine,
    engine_argv: list[str],
    run_dir: Path,
    socket_dir: Path | None,
    python: Path | None = None,
    cpu_baseline: str = cpu_levels.NATIVE,
) -> dict[str, str]:
    """fastboot's environment plus: the markers its engine-side plugin looks for, where the
    engine binds its sockets (socket_dir), NCCL settings for tensor parallelism, for an
    engine run by another environment's interpreter what `activate` would set, and the
    CPU ceiling (cpu_baseline_env)."""
    env = dict(os.environ)
    env[envs.ENGINE_CHILD] = "1"
    env[envs.PLUGIN_REPORT] = str(run_dir / "plugin-report")
    env.update(tensor_parallel_env(engine_argv, env))
    if python is not None:
        # Tools the engine runs by name come from its environment.
        env["VIRTUAL_ENV"] = str(python.parent.parent)
        env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    if socket_dir is not None:
        env.update(engine.socket_env(socket_dir))
    env.update(cpu_baseline_env(cpu_baseline, env))
    return env


def cpu_baseline_env(level: str, env: dict[str, str]) -> dict[str, str]:
    """What holds an engine's code to level (cpu_levels.baseline_env), the user's own
    GLIBC_TUNABLES kept, and the start-up hook that holds torch's CPU checks
    (patches/cpu_ceiling/sitecustomize.py) first on PYTHONPATH; {} for native."""
    held = cpu_levels.baseline_env(level)
    if not held:
        return {}
    if env.get("GLIBC_TUNABLES"):
        held["GLIBC_TUNABLES"] = f"{env['GLIBC_TUNABLES']}:{held['GLIBC_TUNABLES']}"
    hook = _patches_dir() / "cpu_ceiling"
    held["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook), env.get("PYTHONPATH")) if p)
    return held


def _patches_dir() -> Path:
    """Where fastboot's engine-side package (patches/, installed as fastboot_patches) lies;
    found without importing it (it is engine code)."""
    spec = importlib.util.find_spec("fastboot_patches")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError("fastboot_patches is not installed beside fastboot")
    return Path(next(iter(spec.submodule_search_locations)))


def tensor_parallel_env(engine_argv: list[str], env: dict[str, str]) -> dict[str, str]:
    """NCCL_CHECKPOINT_ENV for an engine with a tensor-parallel size above 1, except what env
    already sets (the user's choice wins); {} otherwise."""
    size = 1
    for i, arg in enumerate(engine_argv):
        name, eq, value = arg.replace("_", "-").partition("=")
        if name in ("--tensor-parallel-size", "-tp"):
            value = value if eq else (engine_argv[i + 1] if i + 1 < len(engine_argv) else "")
            size = int(value) if value.isdigit() else size
    if size <= 1:
        return {}
    chosen = {k: v for k, v in NCCL_CHECKPOINT_ENV.items() if k not in env}
    logger.warning(
        "tensor parallel size %d: experimental; NCCL's P2P, NVLS, SHM and IB transports are "
        "off so the CUDA checkpoint can capture each rank (%s); the all-reduce cost of that "
        "is unmeasured",
        size,
        " ".join(f"{k}={v}" for k, v in chosen.items()) or "already set",
    )
    return chosen


def check_plugin(run_dir: Path) -> None:
    """Engines swallow plugin errors: say whether fastboot's engine-side plugin really ran."""
    try:
        lines = (run_dir / "plugin-report").read_text().splitlines()
    except FileNotFoundError:
        lines = []
    if lines:
        logger.info("engine-side plugin loaded in %d engine processes", len(lines))
    else:
        logger.warning(
            "fastboot's engine-side plugin did not load in the engine (is it excluded by the "
            "engine's plugin settings, or fastboot installed in another environment?); "
            "quiesce/resume run from fastboot only"
        )
