"""The host fingerprint: what a restored process silently depends on.

A CRIU image holds code that already chose its CPU instructions (torch picks AVX-512/AMX kernels
at import), libraries mapped from this host's files, and the kernel's vDSO. Restoring it where
any of those differ gives wrong answers or crashes, so a snapshot records the fingerprint of the
host that made it and is only restored where `incompatibility()` finds nothing.

The GPU fields (`current(..., gpu=True)`, from `fastboot.gpu.info`) default to "no GPU", so
manifests written before they existed still load, and a snapshot without them is never refused
for a GPU reason.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass
from typing import Any

from fastboot.gpu.info import gpu_fields


@dataclass(frozen=True)
class Fingerprint:
    """The parts of a host a restored engine depends on."""

    cpu_model: str
    """/proc/cpuinfo "model name"."""
    cpu_flags: tuple[str, ...]
    """Sorted CPU feature flags the process may use."""
    machine: str
    """Architecture (x86_64, aarch64)."""
    kernel: str
    """Kernel release (restores on this major.minor or newer: kernel_incompatibility)."""
    glibc: str
    """glibc version (mapped into every process of the image)."""
    python: str
    """Python version of the engine."""
    engine: str
    """Engine name and version, e.g. "vllm 0.32.0+cpu"."""
    gpu_model: str = ""
    """NVML name of the GPUs ("" without a GPU, or for a CPU engine)."""
    gpu_count: int = 0
    """Visible GPUs (0: the snapshot holds no device state)."""
    gpu_memory_mib: int = 0
    """Total memory of the first GPU."""
    gpu_driver: str = ""
    """NVIDIA driver version, e.g. "580.65.06"."""
    gpu_cuda: str = ""
    """CUDA version the driver supports, e.g. "13.0"."""
    gpu_uuids: tuple[str, ...] = ()
    """UUIDs of the GPUs, in index order (the old side of a restore's UUID remap)."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu_flags"] = list(self.cpu_flags)
        data["gpu_uuids"] = list(self.gpu_uuids)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fingerprint:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["cpu_flags"] = tuple(data["cpu_flags"])
        known["gpu_uuids"] = tuple(data.get("gpu_uuids", ()))
        return cls(**known)


def cpu_info() -> tuple[str, tuple[str, ...]]:
    """(model name, sorted feature flags) of this CPU, from /proc/cpuinfo."""
    model, flags = platform.processor() or "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("unknown", platform.machine()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value
    except OSError:
        pass
    return model, tuple(sorted(set(flags.split())))


def current(engine: str, gpu: bool = False) -> Fingerprint:
    """This host's fingerprint for an engine described as "NAME VERSION"; with gpu, also its
    GPUs (for an engine that runs on CUDA)."""
    model, flags = cpu_info()
    glibc = os.confstr("CS_GNU_LIBC_VERSION") or "unknown"
    return Fingerprint(
        cpu_model=model,
        cpu_flags=flags,
        machine=platform.machine(),
        kernel=platform.release(),
        glibc=glibc,
        python=platform.python_version(),
        engine=engine,
        **_gpu_fields(gpu),
    )


def _gpu_fields(wanted: bool) -> dict[str, Any]:
    if not wanted:
        return {}
    fields = gpu_fields()
    fields["gpu_uuids"] = tuple(fields.get("gpu_uuids", ()))
    return fields


def incompatibility(snapshot: Fingerprint, host: Fingerprint) -> str | None:
    """Why a snapshot made on `snapshot` must not be restored on `host`, or None if it may."""
    missing = sorted(set(snapshot.cpu_flags) - set(host.cpu_flags))
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        return f"this CPU lacks features the snapshot's code may use: {shown}"
    for field in ("machine", "glibc", "python", "engine"):
        theirs, ours = getattr(snapshot, field), getattr(host, field)
        if theirs != ours:
            return f"{field} differs: snapshot {theirs}, host {ours}"
    if why := kernel_incompatibility(snapshot.kernel, host.kernel):
        return why
    return _gpu_incompatibility(snapshot, host)


def kernel_version(release: str) -> tuple[int, ...]:
    """(major, minor) of a kernel release string ("6.18.44-fc-v1272" -> (6, 18)); () if it
    does not start with one."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else ()


def kernel_incompatibility(snapshot: str, host: str) -> str | None:
    """A restore needs the kernel interfaces the dumped code uses, not the same build.

    What a restored process depends on in the kernel: the syscalls and their flags it already
    used (io_uring setups, rseq, clone3, memfd, ...; a newer kernel keeps them, an older one
    may lack them), and the vDSO it calls into (CRIU compares the dumped vDSO's symbols with
    the running kernel's at restore and, where they differ, redirects calls through the new
    one: its vDSO proxy, in every CRIU since 1.x on x86-64). Everything else CRIU restores
    itself and `criu restore` fails, cleanly, where the kernel lacks a feature it needs
    (fastboot then cold boots). So a host kernel of the same or a newer major.minor is
    accepted whatever its build string; an older one, or a release that is not a version, is
    refused.

    The files a restored process maps (glibc, Python, torch, the engine's libraries) are not
    trusted by version string alone: CRIU compares each mapped ELF file's build-id with the
    dumped one at restore (`--file-validation buildid`, its default) and fails the restore
    where one was rebuilt (tests/integration/test_mapped_files.py)."""
    theirs, ours = kernel_version(snapshot), kernel_version(host)
    if snapshot == host or (theirs and ours and ours >= theirs):
        return None
    return (
        f"kernel differs: snapshot {snapshot}, host {host} (an older kernel may lack what the "
        "restored code already uses)"
    )


def _gpu_incompatibility(snapshot: Fingerprint, host: Fingerprint) -> str | None:
    """Device state restores only onto the same GPU model and count under the same driver
    major (the checkpoint format is the driver's); memory size follows from the model."""
    if snapshot.gpu_count == 0:
        return None
    if host.gpu_count != snapshot.gpu_count:
        return f"GPU count differs: snapshot {snapshot.gpu_count}, host {host.gpu_count}"
    if host.gpu_model != snapshot.gpu_model:
        return f"GPU model differs: snapshot {snapshot.gpu_model}, host {host.gpu_model}"
    theirs, ours = snapshot.gpu_driver.split(".")[0], host.gpu_driver.split(".")[0]
    if theirs != ours:
        return (
            f"NVIDIA driver major differs: snapshot {snapshot.gpu_driver}, host {host.gpu_driver}"
        )
    return None
