"""Logging set-up for fastboot's entry points (library modules only call getLogger)."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from fastboot import envs


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler to whatever sys.stderr is when a line is written, not when the handler
    was made: a caller that swaps stderr (pytest's capture, a daemon redirecting its output)
    would otherwise leave fastboot writing to a closed stream ("--- Logging error ---")."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass  # StreamHandler.__init__ assigns one; the property always answers sys.stderr


def configure(level: str | None = None) -> None:
    """Send fastboot's log lines to stderr, one line each, at FASTBOOT_LOG_LEVEL (or `level`)."""
    handler = StderrHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s fastboot %(levelname)s %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger("fastboot")
    root.handlers[:] = [handler]
    root.setLevel(level or envs.log_level())
    root.propagate = False
