"""SIGINT/SIGTERM as an exception that unwinds a boot, so every `finally` stops what it started.

`Stop` derives from BaseException on purpose, like KeyboardInterrupt: a Ctrl-C in the middle of
a restore's checks must stop fastboot, not be taken for a failed check (`except FastbootError`)
and fall through to a cold boot.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from types import FrameType

logger = logging.getLogger(__name__)

Handler = Callable[[int, FrameType | None], None]


class Stop(BaseException):
    """SIGINT/SIGTERM arrived: stop the engine and exit."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def raise_stop(signum: int, frame: FrameType | None) -> None:
    """Raise Stop once: later signals only log, so a second Ctrl-C (or a SIGINT and the
    SIGTERM a supervisor sends after it) cannot raise again inside the `finally` that is
    stopping the engines and orphan them."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, already_stopping)
    raise Stop(signal.Signals(signum).name)


def already_stopping(signum: int, frame: FrameType | None) -> None:
    logger.info("%s: already stopping the engine", signal.Signals(signum).name)


@contextlib.contextmanager
def captured_signals(handler: Handler = raise_stop) -> Iterator[None]:
    """SIGINT and SIGTERM go to handler inside the block; the previous handlers after it."""
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
