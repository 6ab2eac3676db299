"""What a restored CUDA process depends on, read from NVML (pynvml, from nvidia-ml-py).

`gpu_fields()` feeds the host fingerprint: model, count, memory, driver and CUDA versions.
It returns {} where nvidia-ml-py or the driver is missing, so a CPU host fingerprints as before.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_fields(nvml: Any = None) -> dict[str, Any]:
    """{"gpu_model", "gpu_count", "gpu_memory_mib", "gpu_driver", "gpu_cuda", "gpu_uuids"} of the
    visible GPUs, or {} when there is no NVML or no GPU. `nvml` is for tests (default pynvml).

    gpu_model is the first GPU's name; mixed models are joined with " + " so a mixed host never
    matches a uniform one. gpu_memory_mib is the first GPU's total memory.
    """
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            return {}
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError, or the library itself missing
        logger.debug("no NVML: %s", exc)
        return {}
    try:
        count = int(nvml.nvmlDeviceGetCount())
        if count == 0:
            return {}
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        names = [_text(nvml.nvmlDeviceGetName(h)) for h in handles]
        memory = int(nvml.nvmlDeviceGetMemoryInfo(handles[0]).total) // (1 << 20)
        uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = int(nvml.nvmlSystemGetCudaDriverVersion())
    except Exception as exc:
        logger.warning("NVML answered nvmlInit but not the device queries: %s", exc)
        return {}
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:
            logger.debug("nvmlShutdown: %s", exc)
    return {
        "gpu_model": " + ".join(sorted(set(names))),
        "gpu_count": count,
        "gpu_memory_mib": memory,
        "gpu_driver": driver,
        "gpu_cuda": f"{cuda // 1000}.{cuda % 1000 // 10}",
        "gpu_uuids": uuids,
    }
