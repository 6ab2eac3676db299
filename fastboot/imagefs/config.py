"""What a mount daemon is told: the knobs a mount passes on to it (`Tuning`) and its whole
config (`DaemonConfig`, JSON as its only argument).

Apart from daemon.py so that the mounting side (mount.py and what imports it: the CLI, serve)
gets them without importing trio, pyfuse3 and prometheus_client, which only the daemon process
needs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

#: Chunks fetched ahead of a sequential reader (capped by the RAM cache: fs.py's
#: _readahead_depth).
READAHEAD_CHUNKS = 12


@dataclass(frozen=True, kw_only=True)
class Tuning:
    """How a mount's daemon behaves: the part of `MountOptions` that `DaemonConfig` carries
    over unchanged (defaults suit a Python env or model weights)."""

    metrics_port: int = 0
    """Serve Prometheus metrics on 127.0.0.1:PORT (0: only the textfile in the store)."""
    ram_bytes: int = 64 * 1024 * 1024
    """Verified chunks kept in the daemon (the kernel's page cache keeps what readers read; this
    holds chunks in flight and partly read ones). Every byte of it is a buffer a cold read
    touches fresh, which is dear on VMs (fastboot/imagefs/buffers.py): 64 MiB read a cold 1 GiB
    file at least as fast as 256 MiB here."""
    threads: int = 8
    readahead_chunks: int = READAHEAD_CHUNKS
    prefetch: bool = True
    prefetch_rate: int = 256 * 1024 * 1024
    """Bytes per second the profile replay may use (0: no cap)."""
    record: bool = True
    """Record the first-access order and save it as the image's profile."""
    read_ahead_kb: int = 1024
    """Kernel readahead of the mount (the bdi default of 128 KiB makes small FUSE reads; bigger:
    fewer, larger reads of big files; smaller: fewer bytes fetched around each page fault of a
    mapped file, e.g. a shared library)."""
    passthrough: bool = True
    """Big files read whole are kept as local files that the kernel reads directly (FUSE
    passthrough: warm reads at local-disk speed) where this host can; off, the daemon serves
    every read."""

    def tuning(self) -> dict[str, Any]:
        """The `Tuning` fields' values, to build another kind of `Tuning` from."""
        return {f.name: getattr(self, f.name) for f in fields(Tuning)}


@dataclass(frozen=True)
class DaemonConfig(Tuning):
    """Everything one daemon needs; written by the mounting process."""

    store: str
    name: str
    index: str
    """Hex digest of the index to serve (checked when loaded)."""
    mountpoint: str
    remote: str | None
    metrics_file: str
    allow_other: bool = True
    log_level: str = "INFO"
    ready_fd: int = -1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DaemonConfig:
        return cls(**json.loads(text))
