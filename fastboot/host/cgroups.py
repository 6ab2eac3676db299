"""Per-replica resource limits with cgroups (v2 where the unified hierarchy has controllers,
else the v1 memory and cpu hierarchies). Hosts without writable cgroups run replicas unlimited;
`fastboot doctor` says which case a host is in.

A restored replica's processes are moved in right after `criu restore` returns (writing each
pid to cgroup.procs moves all its threads; processes forked later inherit the group).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None = None
    """Hard memory limit per replica (None: unlimited)."""
    cpus: float | None = None
    """CPU time per replica, in cores (None: unlimited)."""

    @property
    def any(self) -> bool:
        return self.memory_bytes is not None or self.cpus is not None


def _v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


class ReplicaCgroup:
    """The cgroup(s) of one replica under fastboot/<agent>/<replica>."""

    def __init__(self, agent: str, replica: str) -> None:
        self.name = f"fastboot/{agent}/{replica}"
        if _v2():
            self.dirs = [ROOT / self.name]
        else:
            self.dirs = [ROOT / "memory" / self.name, ROOT / "cpu" / self.name]

    def apply(self, limits: Limits, pids: list[int]) -> bool:
        """Create the group(s), set limits, move pids in; False (logged) where not possible."""
        try:
            for path in self.dirs:
                path.mkdir(parents=True, exist_ok=True)
            self._set_limits(limits)
            for path in self.dirs:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        (path / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            logger.warning("replica limits not applied (%s): %s", self.name, exc)
            return False
        return True

    def _set_limits(self, limits: Limits) -> None:
        if _v2():
            path = self.dirs[0]
            if limits.memory_bytes is not None:
                (path / "memory.max").write_text(str(limits.memory_bytes))
            if limits.cpus is not None:
                (path / "cpu.max").write_text(f"{int(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")
            return
        memory, cpu = self.dirs
        if limits.memory_bytes is not None:
            (memory / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
        if limits.cpus is not None:
            (cpu / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (cpu / "cpu.cfs_quota_us").write_text(str(int(limits.cpus * CPU_PERIOD_US)))

    def memory_limit(self) -> int | None:
        """The memory limit in force, as the kernel reports it."""
        name = "memory.max" if _v2() else "memory.limit_in_bytes"
        try:
            text = (self.dirs[0] / name).read_text().strip()
        except OSError:
            return None
        return None if text == "max" else int(text)

    def remove(self) -> None:
        """Remove the group(s) once their processes are gone (idempotent)."""
        for path in self.dirs:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(path)


def sweep(agent: str, keep: set[str]) -> None:
    """Remove this agent's empty replica groups other than keep (after a crash), and the
    agent's own group when nothing is kept."""
    parents = (
        [ROOT / "fastboot" / agent]
        if _v2()
        else [ROOT / h / "fastboot" / agent for h in ("memory", "cpu")]
    )
    for parent in parents:
        with contextlib.suppress(FileNotFoundError):
            for child in parent.iterdir():
                if child.is_dir() and child.name not in keep:
                    with contextlib.suppress(OSError):
                        os.rmdir(child)
        if not keep:
            for path in (parent, parent.parent):  # fastboot/<agent>, then fastboot/ if empty
                with contextlib.suppress(OSError):
                    os.rmdir(path)
