"""SIGINT/SIGTERM raise Stop once; a second signal while stopping only logs."""

from __future__ import annotations

import os
import signal

import pytest

from fastboot.host.signals import Stop, captured_signals


def test_a_second_signal_while_stopping_does_not_raise_again() -> None:
    before = signal.getsignal(signal.SIGINT)
    stopped_cleanly = False
    with captured_signals():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 0)  # let the handler run (Python runs it between bytecodes)
            pytest.fail("SIGINT did not raise Stop")
        except Stop as stop:
            assert str(stop) == "SIGINT"
            # What run_until_stopped's finally does while stopping: a SIGTERM now must not
            # cut it short.
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 0)
            stopped_cleanly = True
    assert stopped_cleanly
    assert signal.getsignal(signal.SIGINT) is before  # the block's handlers are undone
