"""Logging set-up for fastboot's entry points (library modules only call getLogger)."""

from __future__ import annotations

import logging

from fastboot import envs


def configure(level: str | None = None) -> None:
    """Send fastboot's log lines to stderr, one line each, at FASTBOOT_LOG_LEVEL (or `level`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s fastboot %(levelname)s %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger("fastboot")
    root.handlers[:] = [handler]
    root.setLevel(level or envs.log_level())
    root.propagate = False
