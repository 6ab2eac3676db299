"""The host fingerprint: what a restored process silently depends on.

A CRIU image holds code that already chose its CPU instructions (torch picks AVX-512/AMX kernels
at import), libraries mapped from this host's files, and the kernel's vDSO. Restoring it where
any of those differ gives wrong answers or crashes, so a snapshot records the fingerprint of the
host that made it and is only restored where `incompatibility()` finds nothing. GPU fields join
with the GPU path.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from typing import Any


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
    """Kernel release (the vDSO and syscalls restored code expects)."""
    glibc: str
    """glibc version (mapped into every process of the image)."""
    python: str
    """Python version of the engine."""
    engine: str
    """Engine name and version, e.g. "vllm 0.32.0+cpu"."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu_flags"] = list(self.cpu_flags)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fingerprint:
        return cls(**{**data, "cpu_flags": tuple(data["cpu_flags"])})


def _cpuinfo() -> tuple[str, tuple[str, ...]]:
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


def current(engine: str) -> Fingerprint:
    """This host's fingerprint for an engine described as "NAME VERSION"."""
    model, flags = _cpuinfo()
    glibc = os.confstr("CS_GNU_LIBC_VERSION") or "unknown"
    return Fingerprint(
        cpu_model=model,
        cpu_flags=flags,
        machine=platform.machine(),
        kernel=platform.release(),
        glibc=glibc,
        python=platform.python_version(),
        engine=engine,
    )


def incompatibility(snapshot: Fingerprint, host: Fingerprint) -> str | None:
    """Why a snapshot made on `snapshot` must not be restored on `host`, or None if it may."""
    missing = sorted(set(snapshot.cpu_flags) - set(host.cpu_flags))
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        return f"this CPU lacks features the snapshot's code may use: {shown}"
    for field in ("machine", "kernel", "glibc", "python", "engine"):
        theirs, ours = getattr(snapshot, field), getattr(host, field)
        if theirs != ours:
            return f"{field} differs: snapshot {theirs}, host {ours}"
    return None
