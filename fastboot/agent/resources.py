"""What a host offers replicas: GPUs (one slot each) or, on CPU hosts, memory-sized slots."""

from __future__ import annotations

import functools
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

from fastboot.snapshot import cpu_levels, fingerprint

#: A CPU replica of the built-in tiny model restores to 1.4 GB resident when its pages are
#: copied, 0.44 GB when they are mapped from the snapshot (measured:
#: benchmarks/results/replicas.json); a slot is sized for the copied case, with headroom for the
#: engine's growth (a mapped replica grows as it writes).
CPU_SLOT_BYTES = 3 << 30


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int


@dataclass(frozen=True)
class Resources:
    kind: str
    """"gpu" when nvidia-smi lists GPUs, else "cpu"."""
    slots: int
    """Replicas this host takes at once."""
    memory_bytes: int
    memory_available_bytes: int
    gpus: list[Gpu] = field(default_factory=list)

    def to_json(self, slots_used: int) -> dict[str, Any]:
        document = asdict(self)
        document["slots_free"] = max(0, self.slots - slots_used)
        return document


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def gpus(timeout: float = 10.0) -> list[Gpu]:
    """The GPUs nvidia-smi reports ([] without a driver)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    query = "index,uuid,name,memory.total,memory.used"
    try:
        result = subprocess.run(
            [smi, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 5 and parts[0].isdigit():
            mib = 1 << 20
            found.append(
                Gpu(int(parts[0]), parts[1], parts[2], int(parts[3]) * mib, int(parts[4]) * mib)
            )
    return found


def probe(slots: int | None = None) -> Resources:
    """This host's resources; slots defaults to one per GPU, or to memory / CPU_SLOT_BYTES."""
    memory = meminfo()
    found = gpus()
    if slots is None:
        slots = len(found) if found else max(1, memory.get("MemTotal", 0) // CPU_SLOT_BYTES)
    return Resources(
        kind="gpu" if found else "cpu",
        slots=slots,
        memory_bytes=memory.get("MemTotal", 0),
        memory_available_bytes=memory.get("MemAvailable", 0),
        gpus=found,
    )


@functools.cache
def host() -> dict[str, Any]:
    """What snapshots restore here depends on, engine aside (fastboot.snapshot.fingerprint):
    the CPU's model, x86-64 level and flags, architecture, kernel, glibc and Python. A
    router or operator reads it to tell the host types of a fleet apart. Read once: none of it
    changes while the agent runs."""
    found = fingerprint.current("")
    return {
        "cpu_model": found.cpu_model,
        "cpu_level": cpu_levels.highest_level(found.cpu_flags),
        "cpu_flags": list(found.cpu_flags),
        "machine": found.machine,
        "kernel": found.kernel,
        "glibc": found.glibc,
        "python": found.python,
    }
