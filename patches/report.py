"""Tell the fastboot launcher that a plugin really loaded in this process."""

from __future__ import annotations

import os
import sys

# Kept free of fastboot imports: this runs inside the engine, where only the names matter.
ENGINE_CHILD = "FASTBOOT_ENGINE_CHILD"
PLUGIN_REPORT = "FASTBOOT_PLUGIN_REPORT"

_reported: set[str] = set()


def launched_by_fastboot() -> bool:
    return bool(os.environ.get(ENGINE_CHILD))


def report_loaded(engine: str) -> None:
    """Append "ENGINE PID ARGV0" to $FASTBOOT_PLUGIN_REPORT, once per process and engine."""
    path = os.environ.get(PLUGIN_REPORT)
    key = f"{engine}:{os.getpid()}"
    if not path or key in _reported:
        return
    _reported.add(key)
    line = f"{engine} {os.getpid()} {os.path.basename(sys.argv[0]) if sys.argv else '?'}\n"
    # O_APPEND writes of one short line are atomic, so processes of the tree can share the file.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
